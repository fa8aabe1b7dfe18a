//! The contents a TV knows about, with precomputed embeddings, searchable by similarity.
//!
//! Built once (each item embedded once, off the recommendation path) and shared read-only by
//! every brain of a process as `Arc<Catalogue>`. Large catalogues get an HNSW index
//! ([`crate::index`]).

use crate::embedder::Embedder;
use crate::error::{DeviceError, Result};
use crate::index::{IndexKind, QuantMatrix, VectorIndex};
use crate::ranking::item_text;
use omega_protocol::ContentType;
use omega_protocol::validate::{self, ValidationError};
use omega_protocol::vector::{QuantizedVector, quantize};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One known content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueItem {
    /// Catalogue id.
    pub content_id: String,
    /// Title.
    #[serde(default)]
    pub title: String,
    /// Genres, at most 16.
    #[serde(default)]
    pub genres: Vec<String>,
    /// Kind of content.
    #[serde(default)]
    pub content_type: ContentType,
}

impl CatalogueItem {
    /// Checks the contract's limits.
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        validate::check_required_string(&format!("{field}.content_id"), &self.content_id)?;
        validate::check_string(&format!("{field}.title"), &self.title)?;
        validate::check_genres(&format!("{field}.genres"), &self.genres)
    }

    /// The text the item is embedded from.
    pub fn text(&self) -> String {
        item_text(self.content_type, &self.title, &self.genres)
    }
}

/// Known contents and their embeddings. Immutable; share as `Arc<Catalogue>`.
#[derive(Debug)]
pub struct Catalogue {
    items: Vec<CatalogueItem>,
    by_id: HashMap<String, u32>,
    index: VectorIndex,
    model_id: String,
}

impl Catalogue {
    /// Validates the items and embeds each one with `embedder` (~2 ms per item).
    pub fn build(items: Vec<CatalogueItem>, embedder: &Embedder) -> Result<Catalogue> {
        Self::build_with(items, embedder.model_id(), |text| embedder.embed_uncached(text))
    }

    /// Like [`Catalogue::build`], with the embedding function supplied (a cache, progress
    /// reporting…). `model_id` names the model behind `embed`.
    pub fn build_with(
        items: Vec<CatalogueItem>,
        model_id: &str,
        mut embed: impl FnMut(&str) -> Result<Vec<f32>>,
    ) -> Result<Catalogue> {
        let by_id = check_items(&items)?;
        let mut matrix = QuantMatrix::new();
        for item in &items {
            let v = embed(&item.text())?;
            validate::check_f32_embedding("catalogue embedding", &v)?;
            matrix.push(&quantize(&v));
        }
        Ok(Catalogue {
            items,
            by_id,
            index: VectorIndex::build(matrix, IndexKind::Auto),
            model_id: model_id.into(),
        })
    }

    /// A catalogue from embeddings computed elsewhere (one per item, 384 finite floats).
    pub fn from_embeddings(
        items: Vec<CatalogueItem>,
        embeddings: &[Vec<f32>],
        model_id: &str,
    ) -> Result<Catalogue> {
        if embeddings.len() != items.len() {
            return Err(DeviceError::State(format!(
                "{} items but {} embeddings",
                items.len(),
                embeddings.len()
            )));
        }
        let mut it = embeddings.iter();
        Self::build_with(items, model_id, |_| Ok(it.next().cloned().unwrap_or_default()))
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Model of the embeddings.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The item with this id.
    pub fn get(&self, content_id: &str) -> Option<&CatalogueItem> {
        self.position(content_id).map(|i| &self.items[i])
    }

    /// Position of an item, for [`Catalogue::item`] and [`Catalogue::embedding`].
    pub fn position(&self, content_id: &str) -> Option<usize> {
        self.by_id.get(content_id).map(|&i| i as usize)
    }

    /// The item at a position.
    pub fn item(&self, i: usize) -> &CatalogueItem {
        &self.items[i]
    }

    /// Every item.
    pub fn items(&self) -> &[CatalogueItem] {
        &self.items
    }

    /// The (int8) embedding at a position.
    pub fn embedding(&self, i: usize) -> QuantizedVector {
        self.index.matrix().get(i)
    }

    /// Cosine of the item at `i` with `q`.
    pub fn similarity(&self, i: usize, q: &QuantizedVector) -> f32 {
        self.index.matrix().similarity(i, q)
    }

    /// The `k` items nearest to `q`, best first: `(position, cosine)`.
    pub fn search(&self, q: &QuantizedVector, k: usize) -> Vec<(u32, f32)> {
        self.index.search(q, k)
    }

    /// The search structure (exact or HNSW).
    pub fn index(&self) -> &VectorIndex {
        &self.index
    }

    /// Approximate bytes held.
    pub fn heap_bytes(&self) -> usize {
        let items: usize = self
            .items
            .iter()
            .map(|i| {
                96 + i.content_id.len()
                    + i.title.len()
                    + i.genres.iter().map(|g| 24 + g.len()).sum::<usize>()
            })
            .sum();
        items + self.by_id.len() * 48 + self.index.heap_bytes()
    }
}

fn check_items(items: &[CatalogueItem]) -> Result<HashMap<String, u32>> {
    let mut by_id = HashMap::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("catalogue[{i}]");
        item.validate(&field)?;
        if by_id.insert(item.content_id.clone(), i as u32).is_some() {
            return Err(ValidationError::Duplicate {
                field: format!("{field}.content_id"),
                id: item.content_id.clone(),
            }
            .into());
        }
    }
    Ok(by_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use omega_protocol::vector::EMBEDDING_DIM;

    fn item(id: &str) -> CatalogueItem {
        CatalogueItem {
            content_id: id.into(),
            title: id.into(),
            genres: vec![],
            content_type: ContentType::Movie,
        }
    }

    fn axis(i: usize) -> Vec<f32> {
        let mut v = vec![0.0; EMBEDDING_DIM];
        v[i] = 1.0;
        v
    }

    #[test]
    fn from_embeddings_searches_and_refuses_bad_input() {
        let c = Catalogue::from_embeddings(vec![item("a"), item("b")], &[axis(0), axis(1)], "m")
            .expect("catalogue");
        assert_eq!(c.len(), 2);
        let top = c.search(&quantize(&axis(1)), 1);
        assert_eq!(c.item(top[0].0 as usize).content_id, "b");
        assert_eq!(c.get("a").map(|i| i.title.as_str()), Some("a"));
        assert!(c.get("zz").is_none());
        assert!(
            Catalogue::from_embeddings(vec![item("a"), item("a")], &[axis(0), axis(1)], "m")
                .is_err()
        );
        assert!(
            Catalogue::from_embeddings(vec![item("a")], &[vec![f32::NAN; EMBEDDING_DIM]], "m")
                .is_err()
        );
        assert!(Catalogue::from_embeddings(vec![item("a")], &[vec![0.1; 3]], "m").is_err());
        assert!(Catalogue::from_embeddings(vec![item("")], &[axis(0)], "m").is_err());
        assert!(Catalogue::from_embeddings(vec![item("a")], &[], "m").is_err());
    }
}
