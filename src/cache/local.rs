//! Paths of the coordinator's own Nix store, ingested into the cache (what
//! evaluation or a local build left there).

use std::path::PathBuf;

use super::*;

/// Path info of paths in the local Nix store (`nix path-info --json`), for
/// ingesting what was built or evaluated on this machine.
pub async fn local_path_info(paths: &[String]) -> Result<Vec<PathInfo>, CacheError> {
    let mut args = vec!["path-info".to_string(), "--json".to_string()];
    args.extend(paths.iter().cloned());
    let out = crate::nix::command::output("nix", &args)
        .await
        .map_err(|e| CacheError::Io(std::io::Error::other(e.to_string())))?;
    #[derive(serde::Deserialize)]
    struct Info {
        path: String,
        #[serde(default)]
        references: Vec<String>,
        deriver: Option<String>,
        ca: Option<String>,
    }
    let infos: Vec<Info> = serde_json::from_slice(&out).map_err(|e| CacheError::Io(std::io::Error::other(e)))?;
    let parse = |s: &str| StorePath::parse(s).map_err(|e| CacheError::Io(std::io::Error::other(e.to_string())));
    infos
        .into_iter()
        .map(|i| {
            Ok(PathInfo {
                path: parse(&i.path)?,
                references: i.references.iter().map(|r| parse(r)).collect::<Result<_, _>>()?,
                deriver: i.deriver.as_deref().map(parse).transpose()?,
                ca: i.ca,
            })
        })
        .collect()
}

/// Ingests paths of the local store (and nothing else of their closure).
pub async fn ingest_local(cache: &Cache, paths: &[String], origin: Origin) -> Result<Vec<NarInfo>, CacheError> {
    let mut out = Vec::new();
    for info in local_path_info(paths).await? {
        if let Some(existing) = cache.kept(&info.path, origin).await? {
            out.push(existing);
            continue;
        }
        let (rx, mut tx) = tokio::io::duplex(256 * 1024);
        let p = PathBuf::from(info.path.to_string());
        let dump = tokio::spawn(async move { crate::nix::nar::dump_path_async(&p, &mut tx).await });
        let (ni, _) = cache.ingest(info, rx, None, origin).await?;
        dump.await.map_err(|e| CacheError::Io(std::io::Error::other(e)))?.map_err(CacheError::Io)?;
        out.push(ni);
    }
    Ok(out)
}
