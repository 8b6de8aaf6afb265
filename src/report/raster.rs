//! The PNG plots' drawing backend: plotters' bitmap backend, with text set by ab_glyph
//! here. plotters 0.3.7's own ab_glyph text drops each glyph's left side bearing, which
//! spaces letters unevenly ("neur ons"); this places every glyph at its pen position,
//! with kerning, and anchors and rotates the text as plotters' other backends do.

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use plotters::prelude::*;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind, FontTransform,
};
type BitMapError = <BitMapBackend<'static> as DrawingBackend>::ErrorType;
type Drawn = Result<(), DrawingErrorKind<BitMapError>>;

/// A [`BitMapBackend`] whose text is drawn with `font`.
pub struct Raster<'a> {
    inner: BitMapBackend<'a>,
    font: FontRef<'static>,
}

impl<'a> Raster<'a> {
    /// Draws into `rgb` (3 bytes a pixel, row by row) of `size` pixels.
    pub fn new(rgb: &'a mut [u8], size: (u32, u32), font: FontRef<'static>) -> Self {
        Self {
            inner: BitMapBackend::with_buffer(rgb, size),
            font,
        }
    }

    /// Glyph outlines of `text` at `size` pixels on a baseline at y = 0, and its width.
    fn layout(&self, text: &str, size: f64) -> (Vec<ab_glyph::OutlinedGlyph>, f32) {
        let scaled = self.font.as_scaled(PxScale::from(size as f32));
        let (mut x, mut previous) = (0.0f32, None);
        let mut glyphs = Vec::new();
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            if let Some(p) = previous {
                x += scaled.kern(p, id);
            }
            let glyph = id.with_scale_and_position(scaled.scale(), point(x, 0.0));
            glyphs.extend(scaled.outline_glyph(glyph));
            x += scaled.h_advance(id);
            previous = Some(id);
        }
        (glyphs, x)
    }
}

impl DrawingBackend for Raster<'_> {
    type ErrorType = BitMapError;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Drawn {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Drawn {
        self.inner.present()
    }

    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> Drawn {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Drawn {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Drawn {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Drawn {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Drawn {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Drawn {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(&mut self, pos: BackendCoord, size: (u32, u32), src: &[u8]) -> Drawn {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        let scaled = self.font.as_scaled(PxScale::from(style.size() as f32));
        let (_, width) = self.layout(text, style.size());
        Ok((
            width.ceil() as u32,
            (scaled.ascent() - scaled.descent()).ceil() as u32,
        ))
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Drawn {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let scaled = self.font.as_scaled(PxScale::from(style.size() as f32));
        let (ascent, descent) = (scaled.ascent(), scaled.descent());
        let (glyphs, width) = self.layout(text, style.size());
        // From the baseline's start to the anchor, in the text's own (unrotated) frame;
        // the box spans [−ascent, −descent] around the baseline (descent is negative).
        let dx = match style.anchor().h_pos {
            HPos::Left => 0.0,
            HPos::Center => -width / 2.0,
            HPos::Right => -width,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => ascent,
            VPos::Center => (ascent + descent) / 2.0,
            VPos::Bottom => descent,
        };
        let transform = style.transform();
        let mut coverage: Vec<(BackendCoord, f32)> = Vec::new();
        for glyph in &glyphs {
            let bounds = glyph.px_bounds();
            glyph.draw(|gx, gy, c| {
                let x = (bounds.min.x + gx as f32 + dx).round() as i32;
                let y = (bounds.min.y + gy as f32 + dy).round() as i32;
                let (x, y) = match transform {
                    FontTransform::None => (x, y),
                    FontTransform::Rotate90 => (-y, x),
                    FontTransform::Rotate180 => (-x, -y),
                    FontTransform::Rotate270 => (y, -x),
                };
                coverage.push(((pos.0 + x, pos.1 + y), c));
            });
        }
        for (point, c) in coverage {
            if c > 0.0 {
                let alpha = color.alpha * f64::from(c.min(1.0));
                self.inner.draw_pixel(
                    point,
                    BackendColor {
                        alpha,
                        rgb: color.rgb,
                    },
                )?;
            }
        }
        Ok(())
    }
}
