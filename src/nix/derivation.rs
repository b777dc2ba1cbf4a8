//! `.drv` files: the ATerm text Nix writes for a derivation
//! (`Derive([outputs],[inputDrvs],[inputSrcs],system,builder,[args],[env])`).
//! Parsing keeps every list in file order so that printing gives back the
//! exact bytes; the queue walks `input_drvs` to build its step graph.

use thiserror::Error;

use super::store_path::{StorePath, StorePathError};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DerivationError {
    #[error("derivation is not valid UTF-8")]
    NotUtf8,
    #[error("malformed derivation at byte {pos}: expected {expected}")]
    Syntax { pos: usize, expected: &'static str },
    #[error("derivation has trailing data at byte {0}")]
    Trailing(usize),
    #[error("derivation refers to a bad store path: {0}")]
    BadPath(#[from] StorePathError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub name: String,
    /// Empty for outputs whose path is not known in advance (content-addressed).
    pub path: String,
    /// `""`, or `sha256`, `r:sha256`, … for fixed-output derivations.
    pub hash_algo: String,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    pub outputs: Vec<Output>,
    /// Input derivation and the outputs of it that are used.
    pub input_drvs: Vec<(StorePath, Vec<String>)>,
    pub input_srcs: Vec<StorePath>,
    pub system: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Derivation {
    pub fn parse(bytes: &[u8]) -> Result<Self, DerivationError> {
        let s = std::str::from_utf8(bytes).map_err(|_| DerivationError::NotUtf8)?;
        let mut p = Parser { s, pos: 0 };
        p.lit("Derive(")?;
        let outputs = p.list(|p| {
            p.lit("(")?;
            let name = p.string()?;
            p.lit(",")?;
            let path = p.string()?;
            p.lit(",")?;
            let hash_algo = p.string()?;
            p.lit(",")?;
            let hash = p.string()?;
            p.lit(")")?;
            Ok(Output { name, path, hash_algo, hash })
        })?;
        p.lit(",")?;
        let input_drvs = p.list(|p| {
            p.lit("(")?;
            let path = StorePath::parse(&p.string()?)?;
            p.lit(",")?;
            let outs = p.list(|p| p.string())?;
            p.lit(")")?;
            Ok((path, outs))
        })?;
        p.lit(",")?;
        let input_srcs = p.list(|p| Ok(StorePath::parse(&p.string()?)?))?;
        p.lit(",")?;
        let system = p.string()?;
        p.lit(",")?;
        let builder = p.string()?;
        p.lit(",")?;
        let args = p.list(|p| p.string())?;
        p.lit(",")?;
        let env = p.list(|p| {
            p.lit("(")?;
            let k = p.string()?;
            p.lit(",")?;
            let v = p.string()?;
            p.lit(")")?;
            Ok((k, v))
        })?;
        p.lit(")")?;
        if p.pos != s.len() {
            return Err(DerivationError::Trailing(p.pos));
        }
        Ok(Derivation { outputs, input_drvs, input_srcs, system, builder, args, env })
    }

    /// The ATerm text, byte for byte as Nix writes it.
    pub fn to_aterm(&self) -> String {
        let mut o = String::with_capacity(1024);
        o.push_str("Derive(");
        list(&mut o, &self.outputs, |o, x| {
            o.push('(');
            string(o, &x.name);
            o.push(',');
            string(o, &x.path);
            o.push(',');
            string(o, &x.hash_algo);
            o.push(',');
            string(o, &x.hash);
            o.push(')');
        });
        o.push(',');
        list(&mut o, &self.input_drvs, |o, (p, outs)| {
            o.push('(');
            string(o, &p.to_string());
            o.push(',');
            list(o, outs, |o, s| string(o, s));
            o.push(')');
        });
        o.push(',');
        list(&mut o, &self.input_srcs, |o, p| string(o, &p.to_string()));
        o.push(',');
        string(&mut o, &self.system);
        o.push(',');
        string(&mut o, &self.builder);
        o.push(',');
        list(&mut o, &self.args, |o, s| string(o, s));
        o.push(',');
        list(&mut o, &self.env, |o, (k, v)| {
            o.push('(');
            string(o, k);
            o.push(',');
            string(o, v);
            o.push(')');
        });
        o.push(')');
        o
    }

    pub fn env_get(&self, key: &str) -> Option<&str> {
        self.env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Output paths by name (those that are known in advance).
    pub fn output_paths(&self) -> impl Iterator<Item = (&str, Result<StorePath, StorePathError>)> {
        self.outputs.iter().filter(|o| !o.path.is_empty()).map(|o| (o.name.as_str(), StorePath::parse(&o.path)))
    }

    /// Features a builder must support (`requiredSystemFeatures`).
    pub fn required_features(&self) -> Vec<String> {
        self.env_get("requiredSystemFeatures")
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }

    pub fn is_fixed_output(&self) -> bool {
        self.outputs.len() == 1 && !self.outputs[0].hash.is_empty()
    }
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, expected: &'static str) -> DerivationError {
        DerivationError::Syntax { pos: self.pos, expected }
    }

    fn lit(&mut self, l: &'static str) -> Result<(), DerivationError> {
        if self.s[self.pos..].starts_with(l) {
            self.pos += l.len();
            Ok(())
        } else {
            Err(self.err(l))
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    fn string(&mut self) -> Result<String, DerivationError> {
        self.lit("\"").map_err(|_| self.err("a string"))?;
        let mut out = String::new();
        let bytes = self.s.as_bytes();
        let mut start = self.pos;
        loop {
            match bytes.get(self.pos) {
                None => return Err(self.err("end of string")),
                Some(b'"') => {
                    out.push_str(&self.s[start..self.pos]);
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    out.push_str(&self.s[start..self.pos]);
                    let c = self.s[self.pos + 1..].chars().next().ok_or_else(|| self.err("an escaped character"))?;
                    out.push(match c {
                        'n' => '\n',
                        'r' => '\r',
                        't' => '\t',
                        c => c,
                    });
                    self.pos += 1 + c.len_utf8();
                    start = self.pos;
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, DerivationError>,
    ) -> Result<Vec<T>, DerivationError> {
        self.lit("[")?;
        let mut v = Vec::new();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(v);
        }
        loop {
            v.push(item(self)?);
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(v);
                }
                _ => return Err(self.err("',' or ']'")),
            }
        }
    }
}

fn string(o: &mut String, s: &str) {
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c => o.push(c),
        }
    }
    o.push('"');
}

fn list<T>(o: &mut String, items: &[T], mut f: impl FnMut(&mut String, &T)) {
    o.push('[');
    for (i, x) in items.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        f(o, x);
    }
    o.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DRV: &str = r#"Derive([("out","/nix/store/0k6hf8zwk0b1dq0hrh2iqbb6d2p2ijpw-x","","")],[("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-dep.drv",["dev","out"])],["/nix/store/9krlzvny65gdc8s7kpb6lkx8cd02c25b-src"],"x86_64-linux","/bin/sh",["-c","echo \"hi\"\\n\n\t"],[("builder","/bin/sh"),("name","x"),("requiredSystemFeatures","kvm big"),("out","/nix/store/0k6hf8zwk0b1dq0hrh2iqbb6d2p2ijpw-x")])"#;

    #[test]
    fn parses_and_prints_identically() {
        let d = Derivation::parse(DRV.as_bytes()).unwrap();
        assert_eq!(d.outputs[0].name, "out");
        assert_eq!(d.input_drvs[0].1, vec!["dev", "out"]);
        assert_eq!(d.args[1], "echo \"hi\"\\n\n\t");
        assert_eq!(d.required_features(), vec!["kvm", "big"]);
        assert_eq!(d.to_aterm(), DRV);
    }

    #[test]
    fn malformed_is_an_error() {
        for bad in [
            "",
            "Derive(",
            "Derive([],[],[],\"x\",\"y\",[],[])extra",
            "Derive([],[],[\"/tmp/x\"],\"x\",\"y\",[],[])",
            "Derive([],[],[],\"x\",\"y\",[],[(\"a\")])",
            "Derive([],[],[],\"x,\"y\",[],[])",
            "Derive([],[],[],\"x\",\"y\\",
        ] {
            assert!(Derivation::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(Derivation::parse(&[0xff]), Err(DerivationError::NotUtf8));
    }

    proptest! {
        #[test]
        fn parser_never_panics(s in "\\PC*") {
            let _ = Derivation::parse(s.as_bytes());
        }

        #[test]
        fn parser_never_panics_on_near_misses(cut in 0usize..DRV.len(), byte in any::<u8>()) {
            let mut b = DRV.as_bytes().to_vec();
            b[cut] = byte;
            let _ = Derivation::parse(&b);
            let _ = Derivation::parse(&DRV.as_bytes()[..cut]);
        }

        #[test]
        fn strings_roundtrip(args in proptest::collection::vec("\\PC*", 0..4), k in "[a-z]{1,8}", v in "(.|\n|\r|\t|\"|\\\\)*") {
            let d = Derivation {
                outputs: vec![],
                input_drvs: vec![],
                input_srcs: vec![],
                system: "x86_64-linux".into(),
                builder: "/bin/sh".into(),
                args,
                env: vec![(k, v)],
            };
            let text = d.to_aterm();
            prop_assert_eq!(Derivation::parse(text.as_bytes()).unwrap(), d);
        }
    }
}
