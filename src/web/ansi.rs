//! Build logs as HTML: ANSI colour codes become spans with classes, the
//! rest is escaped, and every line gets an anchor (`#L12`).

/// Renders `text` as HTML lines, numbered from `first_line`.
pub fn to_html(text: &str, first_line: usize) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    let mut open = false;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let n = first_line + i;
        out.push_str(&format!("<span class=\"l\" id=\"L{n}\"><a href=\"#L{n}\">{n}</a>"));
        if open {
            // A colour runs on across the line break.
            out.push_str("<span>");
        }
        let mut chars = line.trim_end_matches('\n').chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\u{1b}' if chars.peek() == Some(&'[') => {
                    chars.next();
                    let mut code = String::new();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            if c == 'm' {
                                if open {
                                    out.push_str("</span>");
                                    open = false;
                                }
                                let classes = sgr_classes(&code);
                                if !classes.is_empty() {
                                    out.push_str(&format!("<span class=\"{}\">", classes.join(" ")));
                                    open = true;
                                }
                            }
                            break;
                        }
                        code.push(c);
                    }
                }
                '\r' => {}
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '&' => out.push_str("&amp;"),
                '"' => out.push_str("&quot;"),
                c if c.is_control() && c != '\t' => {}
                c => out.push(c),
            }
        }
        if open {
            out.push_str("</span>");
        }
        out.push_str("</span>\n");
    }
    out
}

fn sgr_classes(code: &str) -> Vec<String> {
    let mut classes = Vec::new();
    for part in code.split(';') {
        match part.parse::<u32>().unwrap_or(0) {
            1 => classes.push("b".to_string()),
            n @ 30..=37 => classes.push(format!("c{}", n - 30)),
            n @ 90..=97 => classes.push(format!("c{}", n - 90 + 8)),
            _ => {}
        }
    }
    classes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_escapes_and_anchors() {
        let html = to_html("plain <b>\n\u{1b}[31;1merror:\u{1b}[0m bad & worse\n", 1);
        assert!(html.contains("<span class=\"l\" id=\"L1\"><a href=\"#L1\">1</a>plain &lt;b&gt;</span>"));
        assert!(html.contains("<span class=\"c1 b\">error:</span> bad &amp; worse"));
        assert!(html.contains("id=\"L2\""));
        assert!(!html.contains('\u{1b}'));
    }
}
