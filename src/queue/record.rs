//! Recording a walk: one step row per derivation to build or substitute,
//! and the edges between them, in a few multi-row statements; rows that an
//! earlier build or a killed runner left in another state are put right
//! here, in the same transaction.

use super::*;

impl Runner {
    /// Writes the walk's steps to the database: one row per derivation to
    /// build (`waiting`) or to substitute (`substituted`, for the build
    /// pages), and the edges between them, in a few multi-row statements.
    pub(super) async fn record_nodes(
        &self,
        nodes: &HashMap<String, walk::Node>,
    ) -> Result<HashMap<String, steps::StepRef>, DbError> {
        let mut new = Vec::new();
        for (drv, n) in nodes {
            match n {
                walk::Node::Build { system, features, .. } => new.push(steps::NewStep {
                    drv_path: drv,
                    system,
                    required_features: features.join(" "),
                    state: "waiting",
                }),
                walk::Node::Substitutable => new.push(steps::NewStep {
                    drv_path: drv,
                    system: "",
                    required_features: String::new(),
                    state: "substituted",
                }),
                walk::Node::Cached | walk::Node::Missing(_) => {}
            }
        }
        let cached: Vec<&str> =
            nodes.iter().filter(|(_, n)| matches!(n, walk::Node::Cached)).map(|(d, _)| d.as_str()).collect();
        if new.is_empty() && cached.is_empty() {
            return Ok(HashMap::new());
        }
        let mut tx = self.db.begin().await?;
        let mut rows = steps::get_or_create_many(tx.ex(), &new).await?;
        // A cached derivation's row says whether its outputs are a failure's.
        rows.extend(steps::get_many_by_drv(tx.ex(), &cached).await?);
        // A step whose outputs are in the cache is done, whatever its row
        // says: a runner killed between storing the outputs and recording
        // the step left it running (then runnable), and nothing would ever
        // move it again.
        let stale: Vec<i64> = cached
            .iter()
            .filter_map(|d| rows.get(*d))
            .filter(|r| r.state == "runnable" || r.state == "running")
            .map(|r| r.id)
            .collect();
        if !stale.is_empty() {
            info!(steps = stale.len(), "steps whose outputs are in the cache are recorded as succeeded");
            steps::set_state_many(tx.ex(), &stale, "succeeded", &["succeeded"]).await?;
        }
        // A derivation substituted now may have a row from an earlier build.
        let subst: HashSet<i64> = nodes
            .iter()
            .filter(|(_, n)| matches!(n, walk::Node::Substitutable))
            .filter_map(|(d, _)| rows.get(d))
            .filter(|r| r.state != "substituted")
            .map(|r| r.id)
            .collect();
        if !subst.is_empty() {
            let ids: Vec<i64> = subst.iter().copied().collect();
            steps::set_state_many(tx.ex(), &ids, "substituted", &["running"]).await?;
            for r in rows.values_mut() {
                if subst.contains(&r.id) && r.state != "running" {
                    r.state = "substituted".into();
                }
            }
        }
        // A derivation to build now may have been substituted before.
        let rebuild: HashSet<i64> = nodes
            .iter()
            .filter(|(_, n)| matches!(n, walk::Node::Build { .. }))
            .filter_map(|(d, _)| rows.get(d))
            .filter(|r| r.state == "substituted")
            .map(|r| r.id)
            .collect();
        if !rebuild.is_empty() {
            let ids: Vec<i64> = rebuild.iter().copied().collect();
            steps::set_state_many(tx.ex(), &ids, "waiting", &["running"]).await?;
            for r in rows.values_mut() {
                if rebuild.contains(&r.id) {
                    r.state = "waiting".into();
                }
            }
        }
        let mut edges = Vec::new();
        for (drv, n) in nodes {
            if let (walk::Node::Build { inputs, .. }, Some(row)) = (n, rows.get(drv)) {
                for i in inputs {
                    let dep = rows.get(i).map(|r| r.id).or_else(|| self.by_drv.get(i).copied());
                    if let Some(dep) = dep {
                        edges.push((row.id, dep));
                    }
                }
            }
        }
        steps::add_deps_many(tx.ex(), &edges).await?;
        tx.commit().await?;
        Ok(rows)
    }
}
