//! Shared fixtures: one embedder per test process, a small catalogue, events.

use omega_device::embedder::EmbedderBackend;
use omega_device::{Catalogue, CatalogueItem, Embedder, EmbedderConfig, assets};
use omega_protocol::{ContentType, DayType, TimeSlot, ViewingContext, ViewingEvent};
use std::sync::{Arc, OnceLock};

/// Fails (never skips) when an asset of the default backend (`OMEGA_EMBEDDER_BACKEND`) is
/// missing, saying how to fetch it.
pub fn require_assets() {
    let mut needed = vec![("tokenizer", assets::tokenizer_path())];
    match EmbedderBackend::from_env_or_build() {
        EmbedderBackend::Onnxruntime => {
            needed.push(("ONNX Runtime", assets::ort_dylib_path()));
            needed.push(("model", assets::model_path()));
        }
        EmbedderBackend::Tract => needed.push(("tract model", assets::tract_model_path())),
    }
    for (what, path) in needed {
        assert!(
            path.as_ref().is_some_and(|p| p.is_file()),
            "{what} not found ({path:?}): run `python3 scripts/assets.py fetch all` and \
             `eval \"$(python3 scripts/assets.py env)\"` first"
        );
    }
}

/// The process's shared embedder.
pub fn embedder() -> Arc<Embedder> {
    static E: OnceLock<Arc<Embedder>> = OnceLock::new();
    E.get_or_init(|| {
        require_assets();
        Arc::new(Embedder::new(EmbedderConfig::default()).expect("embedder loads"))
    })
    .clone()
}

fn item(id: &str, title: &str, genres: &[&str], t: ContentType) -> CatalogueItem {
    CatalogueItem {
        content_id: id.into(),
        title: title.into(),
        genres: genres.iter().map(|g| g.to_string()).collect(),
        content_type: t,
    }
}

/// A small catalogue: crime films, cartoons, cooking shows, football, news.
pub fn items() -> Vec<CatalogueItem> {
    use ContentType::*;
    vec![
        item("heat", "Heat", &["crime", "thriller"], Movie),
        item("godfather", "The Godfather", &["crime", "drama"], Movie),
        item("goodfellas", "Goodfellas", &["crime", "drama"], Movie),
        item("casino", "Casino", &["crime", "drama"], Movie),
        item("scarface", "Scarface", &["crime", "drama"], Movie),
        item("departed", "The Departed", &["crime", "thriller"], Movie),
        item("toystory", "Toy Story", &["animation", "children", "comedy"], Kids),
        item("lionking", "The Lion King", &["animation", "children", "musical"], Kids),
        item("frozen", "Frozen", &["animation", "children", "musical"], Kids),
        item("nemo", "Finding Nemo", &["animation", "children"], Kids),
        item("bakeoff", "The Great Bake Off", &["cooking", "reality"], Series),
        item("masterchef", "MasterChef", &["cooking", "competition"], Series),
        item("chefstable", "Chef's Table", &["cooking", "documentary"], Documentary),
        item("cl-final", "Champions League Final", &["football", "live"], Sports),
        item("derby", "North London Derby", &["football"], Sports),
        item("news9", "Evening News", &["news"], News),
        item("planet", "Planet Earth", &["nature", "documentary"], Documentary),
        item("blueplanet", "Blue Planet", &["nature", "ocean", "documentary"], Documentary),
    ]
}

/// The shared catalogue built from [`items`].
pub fn catalogue() -> Arc<Catalogue> {
    static C: OnceLock<Arc<Catalogue>> = OnceLock::new();
    C.get_or_init(|| Arc::new(Catalogue::build(items(), &embedder()).expect("catalogue"))).clone()
}

/// 2024-01-06 20:30 UTC, a Saturday evening.
pub const SAT_EVENING: i64 = 1_704_573_000_000;

/// An event for a catalogue item, watched Saturday evening plus `minutes`.
pub fn event(content_id: &str, watch_fraction: f32, minutes: i64) -> ViewingEvent {
    let it = items().into_iter().find(|i| i.content_id == content_id);
    ViewingEvent {
        content_id: content_id.into(),
        title: it.as_ref().map(|i| i.title.clone()).unwrap_or_else(|| content_id.into()),
        genres: it.as_ref().map(|i| i.genres.clone()).unwrap_or_default(),
        content_type: it.map(|i| i.content_type).unwrap_or_default(),
        started_at_ms: SAT_EVENING + minutes * 60_000,
        watch_fraction,
        context: Some(ViewingContext { time_slot: TimeSlot::Evening, day_type: DayType::Weekend }),
    }
}
