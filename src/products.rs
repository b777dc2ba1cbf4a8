//! Build products and metrics, as Hydra reads them from an output's
//! `nix-support/`: `hydra-build-products` (one `type subtype path
//! [defaultpath]` a line: files a build offers for download) and
//! `hydra-metrics` (`name value [unit]` a line: numbers charted over the
//! job's builds), and `failed` (Hydra's "failed with output"). They are
//! read as the output's NAR passes from the builder into the cache
//! ([`Support`]), so nothing is read twice; a product's size is the size
//! of its file in that NAR.

use std::collections::HashMap;

use crate::nix::nar::Event;

/// Each file is read up to this much; Hydra's are a few lines.
const MAX_FILE: usize = 64 * 1024;
/// Sizes are kept for this many files of an output (for its products).
const MAX_SIZES: usize = 200_000;

/// What an output's NAR said of itself.
#[derive(Debug, Default)]
pub struct Support {
    path: Vec<Vec<u8>>,
    /// `nix-support/failed` exists.
    pub failed: bool,
    pub products: Option<String>,
    pub metrics: Option<String>,
    /// Regular files' sizes by their path inside the output ("" for a file output).
    sizes: HashMap<String, u64>,
    reading: Option<(Which, Vec<u8>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Products,
    Metrics,
}

impl Support {
    /// Takes one event of the output's NAR.
    pub fn see(&mut self, e: &Event<'_>) {
        match e {
            Event::Directory { name } => self.path.push(name.to_vec()),
            Event::DirectoryEnd => {
                self.path.pop();
            }
            Event::File { name, size, .. } => {
                let rel = self.relative(name);
                if self.sizes.len() < MAX_SIZES {
                    self.sizes.insert(rel, *size);
                }
                let in_support = self.path.len() == 2 && self.path[1] == b"nix-support";
                if in_support && *name == b"failed" {
                    self.failed = true;
                }
                self.reading = match (in_support, *name) {
                    (true, b"hydra-build-products") => Some((Which::Products, Vec::new())),
                    (true, b"hydra-metrics") => Some((Which::Metrics, Vec::new())),
                    _ => None,
                };
            }
            Event::Symlink { name, .. } => {
                if self.path.len() == 2 && self.path[1] == b"nix-support" && *name == b"failed" {
                    self.failed = true;
                }
            }
            Event::FileData(d) => {
                if let Some((_, buf)) = &mut self.reading {
                    let room = MAX_FILE.saturating_sub(buf.len());
                    buf.extend_from_slice(&d[..d.len().min(room)]);
                }
            }
            Event::FileEnd => {
                if let Some((which, buf)) = self.reading.take() {
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    match which {
                        Which::Products => self.products = Some(text),
                        Which::Metrics => self.metrics = Some(text),
                    }
                }
            }
        }
    }

    /// The path of entry `name` inside the output, from the root's children down.
    fn relative(&self, name: &[u8]) -> String {
        let mut parts: Vec<&[u8]> = self.path.iter().skip(1).map(Vec::as_slice).collect();
        if !name.is_empty() {
            parts.push(name);
        }
        parts.iter().map(|p| String::from_utf8_lossy(p)).collect::<Vec<_>>().join("/")
    }

    /// The size of a file inside the output (`rel` "" for a file output).
    pub fn size_of(&self, rel: &str) -> Option<u64> {
        self.sizes.get(rel).copied()
    }
}

/// One build product.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Product {
    pub kind: String,
    pub subtype: String,
    /// The store path of the file or directory.
    pub path: String,
    /// Its file name (the store path's name for a whole output).
    pub name: String,
    pub default_path: String,
    pub file_size: Option<i64>,
}

/// Parses `hydra-build-products` of output `out_path`, as Hydra does: a
/// line is `type subtype path [defaultpath]`, the path may be quoted, and
/// a path outside this output is ignored (an output cannot offer another's
/// files).
pub fn parse_products(text: &str, out_path: &str, support: &Support) -> Vec<Product> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (kind, rest) = match line.split_once(char::is_whitespace) {
            Some(x) => x,
            None => continue,
        };
        let (subtype, rest) = match rest.trim_start().split_once(char::is_whitespace) {
            Some(x) => x,
            None => continue,
        };
        let rest = rest.trim_start();
        let (path, default_path) = if let Some(q) = rest.strip_prefix('"') {
            match q.split_once('"') {
                Some((p, d)) => (p, d.trim()),
                None => continue,
            }
        } else {
            match rest.split_once(char::is_whitespace) {
                Some((p, d)) => (p, d.trim()),
                None => (rest, ""),
            }
        };
        let word = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !word(kind) || !word(subtype) {
            continue;
        }
        let path = path.trim_end_matches('/');
        let rel = match path.strip_prefix(out_path) {
            Some("") => "",
            Some(r) if r.starts_with('/') => &r[1..],
            _ => continue,
        };
        if rel.split('/').any(|c| c == ".." || c == ".") {
            continue;
        }
        let name = path.rsplit('/').next().unwrap_or(path);
        let name = if rel.is_empty() { name.split_once('-').map(|(_, n)| n).unwrap_or(name) } else { name };
        out.push(Product {
            kind: kind.to_string(),
            subtype: subtype.to_string(),
            path: path.to_string(),
            name: name.to_string(),
            default_path: default_path.to_string(),
            file_size: support.size_of(rel).map(|s| s as i64),
        });
    }
    out
}

/// One metric: `name value [unit]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub unit: Option<String>,
}

/// Parses `hydra-metrics`; lines that are not `name number [unit]` are skipped.
pub fn parse_metrics(text: &str) -> Vec<Metric> {
    let mut out: Vec<Metric> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(name), Some(value)) = (words.next(), words.next()) else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        if !value.is_finite() || name.len() > 255 {
            continue;
        }
        let unit = words.next().map(str::to_string);
        out.retain(|m| m.name != name);
        out.push(Metric { name: name.to_string(), value, unit });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(events: &[Event<'_>]) -> Support {
        let mut s = Support::default();
        for e in events {
            s.see(e);
        }
        s
    }

    #[test]
    fn the_nix_support_files_are_read_as_the_nar_passes() {
        let s = feed(&[
            Event::Directory { name: b"" },
            Event::Directory { name: b"dist" },
            Event::File { name: b"tool.tar.gz", executable: false, size: 1234 },
            Event::FileData(b"gz"),
            Event::FileEnd,
            Event::DirectoryEnd,
            Event::Directory { name: b"nix-support" },
            Event::File { name: b"hydra-build-products", executable: false, size: 40 },
            Event::FileData(b"file binary-dist /nix/store/abc-tool-1/dist/tool.tar.gz\n"),
            Event::FileEnd,
            Event::File { name: b"hydra-metrics", executable: false, size: 10 },
            Event::FileData(b"size 12.5 KiB\nbroken\nlines 3\n"),
            Event::FileEnd,
            Event::DirectoryEnd,
            Event::DirectoryEnd,
        ]);
        assert!(!s.failed);
        let p = parse_products(s.products.as_deref().unwrap(), "/nix/store/abc-tool-1", &s);
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].kind.as_str(), p[0].subtype.as_str(), p[0].name.as_str()),
            ("file", "binary-dist", "tool.tar.gz")
        );
        assert_eq!(p[0].file_size, Some(1234));
        let m = parse_metrics(s.metrics.as_deref().unwrap());
        assert_eq!(
            m,
            vec![
                Metric { name: "size".into(), value: 12.5, unit: Some("KiB".into()) },
                Metric { name: "lines".into(), value: 3.0, unit: None },
            ]
        );
    }

    #[test]
    fn products_outside_the_output_or_malformed_are_ignored() {
        let s = Support::default();
        let text = "file x /nix/store/other-thing/f\nnix-build none /nix/store/abc-tool-1\ndoc manual \"/nix/store/abc-tool-1/share/my doc\" index.html\nbad\nfile x /nix/store/abc-tool-1/../etc\n";
        let p = parse_products(text, "/nix/store/abc-tool-1", &s);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!((p[0].kind.as_str(), p[0].name.as_str()), ("nix-build", "tool-1"));
        assert_eq!((p[1].name.as_str(), p[1].default_path.as_str()), ("my doc", "index.html"));
    }
}
