//! `[invoices]`: who sells (the identity Algerian invoices must show) and
//! the VAT rate, checked at start. Invoicing is off without a seller.

use serde::{Deserialize, Serialize};

/// `[invoices]` as written in the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvoiceSettings {
    pub seller: Option<Seller>,
    #[serde(default = "default_vat")]
    pub vat_rate: f64,
}

fn default_vat() -> f64 {
    0.19
}

impl Default for InvoiceSettings {
    fn default() -> Self {
        Self {
            seller: None,
            vat_rate: default_vat(),
        }
    }
}

/// The seller's identity, as Algerian invoices must show it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Seller {
    pub name: String,
    pub address: String,
    /// Numéro d'identification fiscale.
    pub nif: String,
    /// Numéro d'identification statistique.
    pub nis: String,
    /// Registre du commerce.
    pub rc: String,
}

/// Validated `[invoices]`: `None` seller means invoicing is off.
#[derive(Clone, Debug)]
pub struct Invoicing {
    pub seller: Option<Seller>,
    /// VAT in basis points (19 % = 1900): amounts stay integers.
    pub vat_bp: i64,
}

impl InvoiceSettings {
    /// The key and reason of the first invalid setting.
    pub fn validate(&self) -> Result<Invoicing, (String, String)> {
        if !(0.0..=1.0).contains(&self.vat_rate) || self.vat_rate.is_nan() {
            return Err((
                "invoices.vat_rate".into(),
                "must be between 0 and 1 (0.19 for 19 %)".into(),
            ));
        }
        if let Some(s) = &self.seller {
            for (field, value) in [
                ("name", &s.name),
                ("address", &s.address),
                ("nif", &s.nif),
                ("nis", &s.nis),
                ("rc", &s.rc),
            ] {
                if value.trim().is_empty() || value.len() > 200 {
                    return Err((
                        format!("invoices.seller.{field}"),
                        "must be 1 to 200 characters".into(),
                    ));
                }
            }
        }
        Ok(Invoicing {
            seller: self.seller.clone(),
            vat_bp: (self.vat_rate * 10_000.0).round() as i64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_vat_rate_or_seller_is_refused_naming_the_key() {
        let bad = InvoiceSettings {
            seller: None,
            vat_rate: 1.5,
        };
        assert_eq!(bad.validate().unwrap_err().0, "invoices.vat_rate");
        let seller = Seller {
            name: "iaFactory".into(),
            address: " ".into(),
            nif: "1".into(),
            nis: "2".into(),
            rc: "3".into(),
        };
        let bad = InvoiceSettings {
            seller: Some(seller),
            vat_rate: 0.19,
        };
        assert_eq!(bad.validate().unwrap_err().0, "invoices.seller.address");
        let ok = InvoiceSettings::default();
        assert_eq!(ok.validate().map(|i| i.vat_bp).ok(), Some(1900));
    }
}
