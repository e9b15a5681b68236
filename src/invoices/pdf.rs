//! An invoice as a one-page A4 PDF, drawn with krilla (a maintained PDF
//! writer), DejaVu Sans embedded and subset, so French accents render
//! everywhere and the text can be copied or extracted. The output depends
//! on the invoice only: the same stored invoice gives the same bytes.

use std::sync::OnceLock;

use krilla::Document;
use krilla::color::rgb;
use krilla::geom::{PathBuilder, Point};
use krilla::num::NormalizedF32;
use krilla::page::PageSettings;
use krilla::paint::{Fill, Stroke};
use krilla::surface::Surface;
use krilla::text::{Font, TextDirection};

use super::{Invoice, amount, month_name, words};

static REGULAR: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
static BOLD: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-Bold.ttf");

fn fonts() -> Option<&'static (Font, Font)> {
    static FONTS: OnceLock<Option<(Font, Font)>> = OnceLock::new();
    FONTS
        .get_or_init(|| {
            Some((
                Font::new(REGULAR.to_vec().into(), 0)?,
                Font::new(BOLD.to_vec().into(), 0)?,
            ))
        })
        .as_ref()
}

#[derive(Debug, thiserror::Error)]
#[error("cannot render the invoice: {0}")]
pub struct RenderError(String);

const WIDTH: f32 = 595.0;
const HEIGHT: f32 = 842.0;
const LEFT: f32 = 50.0;
const RIGHT: f32 = WIDTH - 50.0;
/// The width of `text` at `size` in the given font's own advances (no
/// kerning, as krilla draws it): amounts are right-aligned by it.
fn text_width(font: &'static [u8], text: &str, size: f32) -> f32 {
    use skrifa::MetadataProvider;
    use skrifa::instance::{LocationRef, Size};
    let Ok(font) = skrifa::FontRef::new(font) else {
        return 0.0;
    };
    let charmap = font.charmap();
    let metrics = font.glyph_metrics(Size::new(size), LocationRef::default());
    text.chars()
        .filter_map(|c| charmap.map(c))
        .filter_map(|g| metrics.advance_width(g))
        .sum()
}

struct Pen<'s, 'a> {
    surface: &'s mut Surface<'a>,
    fonts: &'static (Font, Font),
}

impl Pen<'_, '_> {
    fn text(&mut self, x: f32, y: f32, size: f32, bold: bool, text: &str) {
        let font = if bold { &self.fonts.1 } else { &self.fonts.0 };
        self.surface.draw_text(
            Point::from_xy(x, y),
            font.clone(),
            size,
            text,
            false,
            TextDirection::Auto,
        );
    }

    /// Text (an amount, a column's title) whose right edge is at `right`.
    fn amount(&mut self, right: f32, y: f32, size: f32, bold: bool, text: &str) {
        let x = right - text_width(if bold { BOLD } else { REGULAR }, text, size);
        self.text(x, y, size, bold, text);
    }

    fn rule(&mut self, y: f32) {
        let mut pb = PathBuilder::new();
        pb.move_to(LEFT, y);
        pb.line_to(RIGHT, y);
        if let Some(path) = pb.finish() {
            self.surface.set_fill(None);
            self.surface.set_stroke(Some(Stroke {
                paint: rgb::Color::new(180, 186, 194).into(),
                width: 0.7,
                ..Default::default()
            }));
            self.surface.draw_path(&path);
            self.surface.set_stroke(None);
            self.surface.set_fill(Some(Fill::default()));
        }
    }

    /// Lines of `text` no wider than about `chars` characters, one per
    /// row from `y` down; returns the next free row.
    fn wrapped(&mut self, x: f32, mut y: f32, size: f32, chars: usize, text: &str) -> f32 {
        let mut line = String::new();
        for word in text.split_whitespace() {
            if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > chars {
                self.text(x, y, size, false, &line);
                y += size * 1.4;
                line.clear();
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        if !line.is_empty() {
            self.text(x, y, size, false, &line);
            y += size * 1.4;
        }
        y
    }
}

fn day(d: chrono::NaiveDate) -> String {
    use chrono::Datelike;
    let month = month_name(&format!("{:04}-{:02}", d.year(), d.month()));
    format!("{} {month}", d.day())
}

pub fn render(invoice: &Invoice) -> Result<Vec<u8>, RenderError> {
    let fonts = fonts().ok_or_else(|| RenderError("the embedded font cannot be read".into()))?;
    let settings =
        PageSettings::from_wh(WIDTH, HEIGHT).ok_or_else(|| RenderError("page size".into()))?;
    let mut document = Document::new();
    let mut page = document.start_page_with(settings);
    let mut surface = page.surface();
    draw(
        &mut Pen {
            surface: &mut surface,
            fonts,
        },
        invoice,
    );
    surface.finish();
    page.finish();
    document.finish().map_err(|e| RenderError(format!("{e:?}")))
}

fn draw(pen: &mut Pen<'_, '_>, invoice: &Invoice) {
    let ink = Fill {
        paint: rgb::Color::new(29, 39, 51).into(),
        opacity: NormalizedF32::ONE,
        rule: Default::default(),
    };
    pen.surface.set_fill(Some(ink.clone()));

    // Title, number, dates.
    let title = if invoice.is_draft() {
        "FACTURE — BROUILLON"
    } else {
        "FACTURE"
    };
    pen.text(LEFT, 70.0, 22.0, true, title);
    let number = invoice.number.as_deref().map_or_else(
        || "Brouillon (non numérotée)".to_owned(),
        |n| format!("N° {n}"),
    );
    pen.text(LEFT, 94.0, 11.0, false, &number);
    pen.text(
        LEFT,
        110.0,
        11.0,
        false,
        &format!("Période : {}", month_name(&invoice.period)),
    );
    let issued = invoice.issued_on.map_or_else(
        || "Date d'émission : à la clôture de la période".to_owned(),
        |d| format!("Date d'émission : {}", day(d)),
    );
    pen.text(LEFT, 126.0, 11.0, false, &issued);

    // Seller and customer, side by side.
    let s = &invoice.seller;
    pen.text(LEFT, 170.0, 10.0, true, "Vendeur");
    pen.text(LEFT, 186.0, 11.0, true, &s.name);
    let mut y = pen.wrapped(LEFT, 201.0, 10.0, 40, &s.address);
    for line in [
        format!("NIF : {}", s.nif),
        format!("NIS : {}", s.nis),
        format!("RC : {}", s.rc),
    ] {
        pen.text(LEFT, y, 10.0, false, &line);
        y += 14.0;
    }
    let c = &invoice.customer;
    let cx = 330.0;
    pen.text(cx, 170.0, 10.0, true, "Client");
    pen.text(cx, 186.0, 11.0, true, &c.name);
    let mut cy = 201.0;
    if let Some(email) = &c.email {
        pen.text(cx, cy, 10.0, false, email);
        cy += 14.0;
    }
    pen.text(cx, cy, 10.0, false, "Compte :");
    pen.text(cx, cy + 13.0, 8.0, false, &c.id);
    cy += 13.0;
    let mut y = y.max(cy + 14.0) + 20.0;

    // Lines.
    let (qty_x, unit_right, total_right) = (330.0, 450.0, RIGHT);
    pen.text(LEFT, y, 10.0, true, "Désignation");
    pen.text(qty_x, y, 10.0, true, "Qté");
    pen.amount(unit_right, y, 10.0, true, "Prix unit. HT");
    pen.amount(total_right, y, 10.0, true, "Montant HT");
    y += 8.0;
    pen.rule(y);
    y += 16.0;
    for line in &invoice.lines {
        let next = pen.wrapped(LEFT, y, 10.0, 46, &line.label);
        pen.text(qty_x, y, 10.0, false, &line.quantity.to_string());
        pen.amount(unit_right, y, 10.0, false, &amount(line.unit_ht));
        pen.amount(total_right, y, 10.0, false, &amount(line.total_ht));
        y = next + 4.0;
    }
    pen.rule(y);
    y += 20.0;

    // Totals.
    let rate = invoice.vat_bp as f64 / 100.0;
    let rate = if rate.fract() == 0.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.2}").replace('.', ",")
    };
    for (label, value, bold) in [
        ("Total HT".to_owned(), invoice.total_ht, false),
        (format!("TVA {rate} %"), invoice.vat, false),
        ("Total TTC".to_owned(), invoice.total_ttc, true),
    ] {
        pen.text(330.0, y, 11.0, bold, &label);
        pen.amount(total_right, y, 11.0, bold, &amount(value));
        y += 18.0;
    }
    y += 16.0;
    let total_words = words::dinars(invoice.total_ttc.max(0) as u64);
    y = pen.wrapped(
        LEFT,
        y,
        10.0,
        90,
        &format!("Arrêtée la présente facture à la somme de : {total_words}."),
    );
    if invoice.is_draft() {
        pen.wrapped(
            LEFT,
            y + 10.0,
            9.0,
            100,
            "Document provisoire : la facture définitive est numérotée à la clôture de la période.",
        );
    }
    pen.text(
        LEFT,
        HEIGHT - 40.0,
        8.0,
        false,
        &format!("{} — NIF {} — NIS {} — RC {}", s.name, s.nif, s.nis, s.rc),
    );
}
