//! Grouping: which patterns mean the same thing.
//!
//! Method (chosen by the measurement in `docs/quality.md`): **content-keyed leader
//! clustering**. Patterns are first split by content id — the exact key of what was
//! watched. Inside one content, identical embeddings (same context text, same model) are
//! collapsed, then a leader pass joins each distinct embedding to the heaviest earlier leader
//! with cosine >= `threshold`, or makes it a new leader. So the context variants of a film
//! ("evening weekday" / "morning weekend") become one group, while a pattern whose embedding
//! does not match what everyone else says the content is (a poisoned or corrupted pattern)
//! lands in a group of its own, where it needs `min_sources` colluding devices to be published.
//!
//! Different content ids are never merged: on MovieLens the nearest other film of a film is a
//! sequel or a namesake, which is not the same thing to recommend.
//!
//! Cost: linear in patterns plus `distinct embeddings × leaders` per content (a handful of
//! contexts), so a million patterns group in about a second.

use crate::intake::{Contribution, Intake};
use omega_protocol::vector::{QuantizedVector, dot_i8};
use std::collections::HashMap;

/// Default cosine at which two embeddings of one content mean the same thing.
pub const DEFAULT_THRESHOLD: f32 = 0.8;

/// Patterns that mean the same thing.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Content index ([`Intake::contents`]).
    pub content: u32,
    /// Indices into [`Intake::items`] (a deterministic order: leader's embedding first).
    pub members: Vec<usize>,
    /// The member whose embedding leads the group.
    pub leader: usize,
}

fn norm_q(v: &QuantizedVector) -> f32 {
    (dot_i8(&v.values, &v.values) as f32).sqrt() * v.scale
}

/// Cosine of two quantised vectors with known norms.
fn cosine_q(a: &QuantizedVector, na: f32, b: &QuantizedVector, nb: f32) -> f32 {
    let d = na * nb;
    if d == 0.0 { 0.0 } else { dot_i8(&a.values, &b.values) as f32 * a.scale * b.scale / d }
}

/// Groups `intake.items` visited in `order` (see [`Intake::canonical_order`]).
pub fn group(intake: &Intake, order: &[usize], threshold: f32) -> Vec<Group> {
    let items = &intake.items;
    let mut groups = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let content = items[order[start]].content;
        let mut end = start;
        while end < order.len() && items[order[end]].content == content {
            end += 1;
        }
        group_content(items, content, &order[start..end], threshold, &mut groups);
        start = end;
    }
    groups
}

/// Leader clustering of one content's patterns.
fn group_content(
    items: &[Contribution],
    content: u32,
    members: &[usize],
    threshold: f32,
    out: &mut Vec<Group>,
) {
    // Distinct embeddings, with their members and total weight.
    let mut index: HashMap<(&[i8], u32), usize> = HashMap::new();
    let mut uniques: Vec<(usize, Vec<usize>, f32)> = Vec::new(); // (representative, members, weight)
    for &i in members {
        let e = &items[i].embedding;
        let u = *index.entry((&e.values[..], e.scale.to_bits())).or_insert_with(|| {
            uniques.push((i, Vec::new(), 0.0));
            uniques.len() - 1
        });
        uniques[u].1.push(i);
        uniques[u].2 += items[i].weight();
    }
    // Heaviest first; ties by the embedding bytes, so the order never depends on arrival.
    uniques.sort_by(|a, b| {
        b.2.total_cmp(&a.2).then_with(|| {
            let (ea, eb) = (&items[a.0].embedding, &items[b.0].embedding);
            ea.values.cmp(&eb.values).then(ea.scale.total_cmp(&eb.scale))
        })
    });
    let first = out.len();
    let mut leaders: Vec<(usize, f32)> = Vec::new(); // (representative, norm)
    for (rep, mut ms, _) in uniques {
        let e = &items[rep].embedding;
        let n = norm_q(e);
        let best = leaders
            .iter()
            .enumerate()
            .map(|(g, &(l, nl))| (g, cosine_q(e, n, &items[l].embedding, nl)))
            .filter(|&(_, c)| c >= threshold)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((g, _)) => out[first + g].members.append(&mut ms),
            None => {
                leaders.push((rep, n));
                out.push(Group { content, members: ms, leader: rep });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::tests::exported;
    use omega_protocol::pb;
    use omega_protocol::vector::{EMBEDDING_DIM, l2_normalize};

    /// A unit vector mostly along axis `axis`, tilted towards `tilt` by `amount`.
    pub(crate) fn unit(axis: usize, tilt: usize, amount: f32) -> Vec<f32> {
        let mut v = vec![0.0f32; EMBEDDING_DIM];
        v[axis] = 1.0;
        v[tilt] += amount;
        l2_normalize(&mut v);
        v
    }

    fn intake(rows: &[(&str, &str, u8, Vec<f32>)]) -> Intake {
        let mut intake = Intake::default();
        let patterns =
            rows.iter().map(|(s, c, id, e)| exported(s, c, *id, e, 0.9)).collect::<Vec<_>>();
        let batch =
            pb::ExportBatch { patterns, shard_id: 1, model_id: "m".into(), ..Default::default() };
        intake.add_batch(&batch, 0.0).expect("ok");
        intake
    }

    fn shape(intake: &Intake, groups: &[Group]) -> Vec<(String, Vec<u8>)> {
        let mut s: Vec<(String, Vec<u8>)> = groups
            .iter()
            .map(|g| {
                let mut ids: Vec<u8> = g.members.iter().map(|&i| intake.items[i].id[0]).collect();
                ids.sort();
                (intake.contents.get(g.content).clone(), ids)
            })
            .collect();
        s.sort();
        s
    }

    #[test]
    fn grouping_table() {
        let same = unit(0, 1, 0.0);
        let context_variant = unit(0, 1, 0.3); // cosine ~0.96
        let unrelated = unit(5, 6, 0.0);
        // (case, rows, threshold, expected groups as (content, member ids))
        type Case<'a> =
            (&'a str, Vec<(&'a str, &'a str, u8, Vec<f32>)>, f32, Vec<(&'a str, Vec<u8>)>);
        let cases: Vec<Case> = vec![
            (
                "identical embeddings of one content from three devices",
                vec![
                    ("a", "x", 1, same.clone()),
                    ("b", "x", 2, same.clone()),
                    ("c", "x", 3, same.clone()),
                ],
                0.8,
                vec![("x", vec![1, 2, 3])],
            ),
            (
                "context variants join; an unrelated embedding under the same id does not",
                vec![
                    ("a", "x", 1, same.clone()),
                    ("b", "x", 2, context_variant.clone()),
                    ("c", "x", 3, unrelated.clone()),
                ],
                0.8,
                vec![("x", vec![1, 2]), ("x", vec![3])],
            ),
            (
                "a strict threshold splits context variants",
                vec![("a", "x", 1, same.clone()), ("b", "x", 2, context_variant.clone())],
                0.99,
                vec![("x", vec![1]), ("x", vec![2])],
            ),
            (
                "the same embedding under two content ids stays two groups",
                vec![("a", "x", 1, same.clone()), ("b", "y", 2, same.clone())],
                0.8,
                vec![("x", vec![1]), ("y", vec![2])],
            ),
        ];
        for (name, rows, threshold, want) in cases {
            let intake = intake(&rows);
            let groups = group(&intake, &intake.canonical_order(), threshold);
            let want: Vec<(String, Vec<u8>)> =
                want.into_iter().map(|(c, m)| (c.to_string(), m)).collect();
            assert_eq!(shape(&intake, &groups), want, "{name}");
        }
    }

    #[test]
    fn the_heaviest_embedding_leads() {
        // Two devices say `same`, one says the variant: `same` leads whatever the order.
        let rows = vec![
            ("c", "x", 3, unit(0, 1, 0.3)),
            ("a", "x", 1, unit(0, 1, 0.0)),
            ("b", "x", 2, unit(0, 1, 0.0)),
        ];
        let intake = intake(&rows);
        let groups = group(&intake, &intake.canonical_order(), 0.8);
        assert_eq!(groups.len(), 1);
        assert_eq!(intake.items[groups[0].leader].id[0], 1);
    }
}
