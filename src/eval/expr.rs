//! The Nix expressions Kiln's evaluator workers run. Each worker process
//! evaluates `builtins.getFlake <locked ref>` in pure mode (as `nix eval
//! .#attr` would) and walks a slice of the job tree, announcing every job as
//! one `builtins.trace` line as soon as it is evaluated, so jobs stream out
//! while the process is still running. Catchable errors (`throw`, `assert`)
//! are caught per job with `tryEval`; the others stop the process and are
//! isolated by the scheduler in `eval::mod`.

use std::fmt::Write as _;

use serde::Serialize;

/// A slice of the job tree: the children `from..to` of the attribute set at
/// `path` (relative to the root attribute), optionally only those named in
/// `only`, walked with `depth` levels of nested sets allowed below them
/// (`None`: any depth, as for `hydraJobs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unit {
    pub path: Vec<String>,
    pub only: Option<Vec<String>>,
    pub from: usize,
    pub to: usize,
    pub depth: Option<u32>,
}

impl Unit {
    pub fn len(&self) -> usize {
        self.to.saturating_sub(self.from)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A Nix string literal for arbitrary text.
pub fn nix_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            '$' if chars.peek() == Some(&'{') => o.push_str("\\$"),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn nix_list(items: &[String]) -> String {
    let mut o = String::from("[");
    for i in items {
        o.push(' ');
        o.push_str(&nix_string(i));
    }
    o.push_str(" ]");
    o
}

fn nix_units(units: &[Unit]) -> String {
    let mut o = String::from("[");
    for u in units {
        let _ = write!(
            o,
            " {{ p = {}; only = {}; f = {}; t = {}; d = {}; }}",
            nix_list(&u.path),
            u.only.as_ref().map(|l| nix_list(l)).unwrap_or_else(|| "null".into()),
            u.from,
            u.to,
            u.depth.map(|d| d.to_string()).unwrap_or_else(|| "null".into()),
        );
    }
    o.push_str(" ]");
    o
}

/// Definitions shared by every expression: the flake, the root attribute,
/// and how a job record is made.
fn prelude(flake_ref: &str, root: &[String], nonce: &str, catch: bool, group_roots: bool) -> String {
    format!(
        r#"let
  b = builtins;
  flakeRef = {flake_ref};
  rootPath = {root};
  nonce = {nonce};
  catch = {catch};
  outputs = (b.getFlake flakeRef).outputs;
  getPath = v: p: b.foldl' (acc: n: acc.${{n}}) v p;
  root = getPath outputs rootPath;
  isDrv = v: b.isAttrs v && (v.type or null) == "derivation";
  try = x: if catch then b.tryEval x else {{ success = true; value = x; }};
  safe = x: let r = b.tryEval (b.deepSeq x x); in if r.success then r.value else null;
  str = x: if b.isString x then x else null;
  int = x: if b.isInt x then x else null;
  firstStr = x: if b.isList x then (if x == [ ] then null else str (b.head x)) else str x;
  joinStr = l: let s = b.filter (x: x != null) l; in if s == [ ] then null else b.concatStringsSep ", " s;
  license = l: if b.isString l then l else if b.isList l then joinStr (map license l)
    else if b.isAttrs l then (l.spdxId or l.shortName or l.fullName or null) else null;
  maintainer = m: if b.isString m then m else if b.isAttrs m then (m.email or m.github or m.name or null) else null;
  dropNulls = s: b.listToAttrs (b.filter (x: x.value != null) (map (n: {{ name = n; value = s.${{n}}; }}) (b.attrNames s)));
  # Most of the cost per job is here, so a derivation without meta pays nothing.
  metaOf = d: if !(d ? meta) then {{ }} else let mr = b.tryEval d.meta; m = if mr.success && b.isAttrs mr.value then mr.value else {{ }}; in dropNulls {{
    description = safe (str (m.description or null));
    license = safe (license (m.license or null));
    maintainers = safe (if b.isList (m.maintainers or null) then joinStr (map maintainer m.maintainers) else null);
    homepage = safe (firstStr (m.homepage or null));
    timeout = safe (int (m.timeout or null));
    maxSilent = safe (int (m.maxSilent or null));
    schedulingPriority = safe (int (m.schedulingPriority or null));
  }};
  outputsOf = d: b.listToAttrs (map (o: {{ name = o; value = d.${{o}}.outPath; }}) (d.outputs or [ "out" ]));
  aggregate = d: if (d._hydraAggregate or false) == true then {{
    constituents = map (c: c.drvPath) (b.filter (c: !(b.isString c)) (d.constituents or [ ]));
    namedConstituents = b.filter b.isString (d.constituents or [ ]);
  }} else {{ }};
  job = path: d: {{ attrPath = path; drvPath = d.drvPath; name = d.name; system = d.system; outputs = outputsOf d; meta = metaOf d; }} // aggregate d;
  # Jobs are traced in groups: one line, one write, per group rather than per job.
  group = 64;
  # With group roots, a group's line also names one store file that
  # references every derivation in it: one GC root keeps them all.
  groupRoots = {group_roots};
  rootOf = recs: let ds = b.concatMap (r: if r ? drvPath then [ (b.unsafeDiscardOutputDependency r.drvPath) ] else [ ]) recs; in
    if ds == [ ] then null else b.toFile "kiln-roots" (b.concatStringsSep "\n" ds);
  line = recs: if groupRoots then {{ jobs = recs; root = rootOf recs; }} else recs;
  emitAll = recs: let n = b.length recs; in b.foldl' (acc: g: acc + b.trace (nonce + b.toJSON (line (b.genList (i: b.elemAt recs (g * group + i)) (if n - g * group < group then n - g * group else group)))) 1) 0 (b.genList (g: g) ((n + group - 1) / group));
  jobRec = path: d: let r = try (let j = job path d; in b.deepSeq j j); in
    if r.success then r.value else {{ attrPath = path; error = true; }};
  dec = d: if d == null then null else d - 1;
  walkValue = path: depth: v: let c = try (if isDrv v then 1 else if b.isAttrs v then 2 else 0); in
    if !c.success then [ {{ attrPath = path; error = true; }} ]
    else if c.value == 1 then [ (jobRec path v) ]
    else if c.value == 2 && (depth == null || depth > 0) then walkSet path (dec depth) v
    else [ ];
  walkSet = path: depth: v: b.concatMap (n: walkValue (path ++ [ n ]) depth v.${{n}}) (b.attrNames v);
  namesOf = u: v: let all = b.attrNames v; in if u.only == null then all else b.filter (n: b.elem n u.only) all;
  slice = u: names: let t = if u.t > b.length names then b.length names else u.t; in
    b.genList (i: b.elemAt names (u.f + i)) (if t > u.f then t - u.f else 0);
in"#,
        flake_ref = nix_string(flake_ref),
        root = nix_list(root),
        nonce = nix_string(nonce),
        catch = if catch { "true" } else { "false" },
        group_roots = if group_roots { "true" } else { "false" },
    )
}

/// Walks `units`, emitting one trace line per group of jobs; evaluates to
/// the count. `group_roots`: each line also names a store file referencing
/// the group's derivations (see [`crate::gcroots`]).
pub fn walk(flake_ref: &str, root: &[String], nonce: &str, catch: bool, group_roots: bool, units: &[Unit]) -> String {
    format!(
        "{}\n  b.foldl' (acc: u: let v = getPath root u.p; in acc + emitAll (b.concatMap (n: walkValue (u.p ++ [ n ]) u.d v.${{n}}) (slice u (namesOf u v)))) 0 {}\n",
        prelude(flake_ref, root, nonce, catch, group_roots),
        nix_units(units)
    )
}

/// Walks the root attribute itself when it is a single derivation.
pub fn walk_root(flake_ref: &str, root: &[String], nonce: &str, group_roots: bool) -> String {
    format!("{}\n  emitAll (walkValue [ ] 0 root)\n", prelude(flake_ref, root, nonce, false, group_roots))
}

/// Describes the value at `path`: `{ kind = "drv" | "set" | "other"; n; }`.
/// Without `tryEval`, so a broken value fails the process with its error.
pub fn classify(flake_ref: &str, root: &[String], nonce: &str, path: &[String], only: Option<&[String]>) -> String {
    let only = only.map(nix_list).unwrap_or_else(|| "null".into());
    format!(
        "{}\n  let v = getPath root {}; in if isDrv v then {{ kind = \"drv\"; }} else if b.isAttrs v then {{ kind = \"set\"; n = b.length (namesOf {{ only = {only}; }} v); }} else {{ kind = \"other\"; }}\n",
        prelude(flake_ref, root, nonce, false, false),
        nix_list(path)
    )
}

/// Names the `index`th child of the unit's set (traced first, so a failure
/// while classifying it is still attributed to it), then classifies it.
pub fn classify_child(flake_ref: &str, root: &[String], nonce: &str, unit: &Unit, index: usize) -> String {
    format!(
        "{}\n  let u = b.head {units}; v = getPath root u.p; n = b.elemAt (namesOf u v) {index}; c = v.${{n}}; in\n  b.seq (b.trace (nonce + b.toJSON {{ name = n; }}) 0) (if isDrv c then {{ kind = \"drv\"; name = n; }} else if b.isAttrs c then {{ kind = \"set\"; name = n; n = b.length (b.attrNames c); }} else {{ kind = \"other\"; name = n; }})\n",
        prelude(flake_ref, root, nonce, false, false),
        units = nix_units(std::slice::from_ref(unit)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped() {
        assert_eq!(nix_string("a\"b\\c\n${x}$y"), r#""a\"b\\c\n\${x}$y""#);
    }
}
