//! Every integration test, as modules of one test binary. One binary links the library
//! once, where one per file linked it twenty times (about a minute each on 2 cores).
//! Run one file's tests with `cargo test --test suite attribute_cli::`.

mod common;

mod attribute_cli;
mod attribute_golden;
mod cli;
mod decoders;
mod decoders_cli;
mod docs;
mod edit;
mod edit_metrics;
mod edit_records;
mod edit_solve;
mod fact_model;
mod findings;
mod findings_smollm2;
mod fuzz_loaders;
mod golden;
mod hub;
mod install;
mod load;
mod merge;
mod pararel;
mod probe_antiberty;
mod reliability;
mod report;
mod tensor_engine;
