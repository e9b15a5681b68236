//! Amounts in French words, as an invoice states its total ("Arrêtée la
//! présente facture à la somme de ..."). Traditional spelling: "vingt et
//! un", "quatre-vingts", "deux cents" but "deux cent un", "mille"
//! invariable, "millions" plural.

const UNITS: [&str; 17] = [
    "zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix", "onze",
    "douze", "treize", "quatorze", "quinze", "seize",
];
const TENS: [&str; 7] = [
    "",
    "dix",
    "vingt",
    "trente",
    "quarante",
    "cinquante",
    "soixante",
];

/// 0..=99. `last`: nothing follows (then "quatre-vingts" takes its s).
fn below_hundred(n: u64, last: bool) -> String {
    match n {
        0..=16 => UNITS[n as usize].to_owned(),
        17..=19 => format!("dix-{}", UNITS[(n - 10) as usize]),
        20..=69 => {
            let (t, u) = (n / 10, n % 10);
            match u {
                0 => TENS[t as usize].to_owned(),
                1 => format!("{} et un", TENS[t as usize]),
                _ => format!("{}-{}", TENS[t as usize], UNITS[u as usize]),
            }
        }
        70..=79 => {
            if n == 71 {
                "soixante et onze".to_owned()
            } else {
                format!("soixante-{}", below_hundred(n - 60, false))
            }
        }
        80 => if last {
            "quatre-vingts"
        } else {
            "quatre-vingt"
        }
        .to_owned(),
        _ => format!("quatre-vingt-{}", below_hundred(n - 80, false)),
    }
}

/// 1..=999. `last`: nothing follows, or only "millions"/"milliards" (then
/// "cents" and "quatre-vingts" take their s).
fn below_thousand(n: u64, last: bool) -> String {
    let (h, rest) = (n / 100, n % 100);
    let hundreds = match h {
        0 => String::new(),
        1 => "cent".to_owned(),
        _ if rest == 0 && last => format!("{} cents", UNITS[h as usize]),
        _ => format!("{} cent", UNITS[h as usize]),
    };
    match (hundreds.is_empty(), rest) {
        (true, _) => below_hundred(rest, last),
        (false, 0) => hundreds,
        (false, _) => format!("{hundreds} {}", below_hundred(rest, last)),
    }
}

/// A whole number in words: `2380` → "deux mille trois cent quatre-vingts".
pub fn number(n: u64) -> String {
    if n == 0 {
        return UNITS[0].to_owned();
    }
    let mut parts = Vec::new();
    let mut push_scale = |count: u64, singular: &str, plural: &str| {
        if count > 0 {
            let word = if count == 1 { singular } else { plural };
            parts.push(format!("{} {word}", number(count)));
        }
    };
    push_scale(n / 1_000_000_000, "milliard", "milliards");
    push_scale((n / 1_000_000) % 1000, "million", "millions");
    let thousands = (n / 1000) % 1000;
    let units = n % 1000;
    match thousands {
        0 => {}
        1 => parts.push("mille".to_owned()),
        t => parts.push(format!("{} mille", below_thousand(t, false))),
    }
    if units > 0 {
        parts.push(below_thousand(units, true));
    }
    // "quatre-vingts millions", "deux cents millions": the s stays before
    // a noun; `number` of a scale count is called with nothing after it.
    parts.join(" ")
}

/// An amount in dinars and centimes: "deux mille trois cent quatre-vingts
/// dinars algériens et cinquante centimes".
pub fn dinars(centimes: u64) -> String {
    let (whole, cents) = (centimes / 100, centimes % 100);
    let millions_only = whole >= 1_000_000 && whole % 1_000_000 == 0;
    let mut out = number(whole);
    out.push_str(match whole {
        0 | 1 => " dinar algérien",
        _ if millions_only => " de dinars algériens",
        _ => " dinars algériens",
    });
    if cents > 0 {
        out.push_str(&format!(
            " et {} centime{}",
            number(cents),
            if cents > 1 { "s" } else { "" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_spelled_as_french_invoices_spell_them() {
        for (n, words) in [
            (0, "zéro"),
            (1, "un"),
            (16, "seize"),
            (17, "dix-sept"),
            (21, "vingt et un"),
            (22, "vingt-deux"),
            (70, "soixante-dix"),
            (71, "soixante et onze"),
            (77, "soixante-dix-sept"),
            (80, "quatre-vingts"),
            (81, "quatre-vingt-un"),
            (91, "quatre-vingt-onze"),
            (99, "quatre-vingt-dix-neuf"),
            (100, "cent"),
            (101, "cent un"),
            (200, "deux cents"),
            (201, "deux cent un"),
            (280, "deux cent quatre-vingts"),
            (1000, "mille"),
            (1001, "mille un"),
            (2000, "deux mille"),
            (2380, "deux mille trois cent quatre-vingts"),
            (80_000, "quatre-vingt mille"),
            (200_000, "deux cent mille"),
            (1_000_000, "un million"),
            (2_000_000, "deux millions"),
            (80_000_000, "quatre-vingts millions"),
            (200_000_000, "deux cents millions"),
            (
                1_234_567,
                "un million deux cent trente-quatre mille cinq cent soixante-sept",
            ),
            (59_500, "cinquante-neuf mille cinq cents"),
            (3_000_000_001, "trois milliards un"),
        ] {
            assert_eq!(number(n), words, "{n}");
        }
    }

    #[test]
    fn amounts_name_the_currency() {
        assert_eq!(
            dinars(238_000),
            "deux mille trois cent quatre-vingts dinars algériens"
        );
        assert_eq!(dinars(100), "un dinar algérien");
        assert_eq!(dinars(0), "zéro dinar algérien");
        assert_eq!(
            dinars(595_050),
            "cinq mille neuf cent cinquante dinars algériens et cinquante centimes"
        );
        assert_eq!(dinars(101), "un dinar algérien et un centime");
        assert_eq!(dinars(200_000_000), "deux millions de dinars algériens");
    }
}
