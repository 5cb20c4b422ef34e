//! Shared prompt prefixes computed once. Texts that begin with the same tokens (the support
//! paragraph and question of SciQ's correct and wrong answers, one prompt scored against several
//! continuations) need the keys and values of those tokens only once: a decoder runs each shared
//! prefix a single time, copies its cache to every text of the group, and runs only the rest.
//!
//! The cache of a batch then holds each group's prefix, right-padded to the longest prefix of the
//! batch, followed by the suffixes: padding sits in the middle of a row. Position ids count real
//! tokens (`positions_from_mask`) and attention masks every padding key, so each suffix sees
//! exactly the keys and positions of its full sequence.

use super::cache::KvCache;
use super::Network;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// Texts (indices into the list that was grouped) whose first `shared` tokens are equal. A
/// group of one text shares nothing (`shared` 0). Every member keeps at least one token after
/// the shared prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixGroup {
    pub shared: usize,
    pub members: Vec<usize>,
}

impl PrefixGroup {
    /// Tokens the group does not compute: every member but one skips the prefix.
    pub fn tokens_saved(&self) -> usize {
        self.shared * self.members.len().saturating_sub(1)
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Groups `seqs` by shared token prefixes of at least `min_shared` tokens. Sequences are visited
/// in lexicographic order (so that sequences with a common prefix are neighbours), and a
/// sequence joins the open group when that does not lower what the group saves: with n members
/// sharing L tokens the group saves (n - 1) L tokens, and a member that shares only L' < L with
/// them makes it n L'. Groups are returned in that order; each index appears exactly once.
pub fn group_by_prefix(seqs: &[Vec<u32>], min_shared: usize) -> Vec<PrefixGroup> {
    let limits: Vec<usize> = seqs.iter().map(|s| s.len().saturating_sub(1)).collect();
    group_by_prefix_within(seqs, &limits, min_shared)
}

/// [`group_by_prefix`] where sequence i shares at most its first `limits[i]` tokens (and always
/// keeps one): scoring shares a prompt but needs the hidden state of its last token.
pub fn group_by_prefix_within(
    seqs: &[Vec<u32>],
    limits: &[usize],
    min_shared: usize,
) -> Vec<PrefixGroup> {
    assert_eq!(seqs.len(), limits.len(), "one limit per sequence");
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by(|&a, &b| seqs[a].cmp(&seqs[b]).then(a.cmp(&b)));
    let mut groups: Vec<PrefixGroup> = Vec::new();
    let close = |group: PrefixGroup, groups: &mut Vec<PrefixGroup>| {
        let shared = if group.members.len() > 1 {
            group.shared
        } else {
            0
        };
        groups.push(PrefixGroup { shared, ..group });
    };
    let mut open: Option<PrefixGroup> = None;
    for i in order {
        let own = seqs[i].len().saturating_sub(1).min(limits[i]);
        open = Some(match open.take() {
            None => PrefixGroup {
                shared: own,
                members: vec![i],
            },
            Some(mut group) => {
                let last = *group.members.last().expect("groups are never empty");
                let shared = group
                    .shared
                    .min(own)
                    .min(common_prefix(&seqs[last], &seqs[i]));
                let n = group.members.len();
                if shared >= min_shared.max(1) && n * shared >= (n - 1) * group.shared {
                    group.shared = shared;
                    group.members.push(i);
                    group
                } else {
                    close(group, &mut groups);
                    PrefixGroup {
                        shared: own,
                        members: vec![i],
                    }
                }
            }
        });
    }
    if let Some(group) = open {
        close(group, &mut groups);
    }
    groups
}

/// Right-pads `rows` into ids [B, T] and 0/1 mask rows (T at least 1).
pub fn right_pad(rows: &[&[u32]], device: &Device) -> Result<(Tensor, Vec<Vec<u32>>)> {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![0u32; rows.len() * t];
    let mut mask = vec![vec![0u32; t]; rows.len()];
    for (row, tokens) in rows.iter().enumerate() {
        ids[row * t..row * t + tokens.len()].copy_from_slice(tokens);
        mask[row][..tokens.len()].fill(1);
    }
    Ok((Tensor::from_vec(ids, (rows.len(), t), device)?, mask))
}

/// Final hidden states [B, S, H] of the tokens after each group's shared prefix, for the members
/// of `groups` in order (B members in all), with the 0/1 mask rows [B, S] of those tokens. Each
/// shared prefix runs once; groups that share nothing run whole. The result equals the last
/// positions of a full forward of each sequence (up to rounding).
pub fn suffix_hidden(
    network: &Network,
    seqs: &[Vec<u32>],
    groups: &[PrefixGroup],
    device: &Device,
) -> Result<(Tensor, Vec<Vec<u32>>)> {
    let (mut cache, ids, mask) = prefix_then_suffixes(network, seqs, groups, device)?;
    let hidden = network.hidden(&ids, &mask, &mut cache)?;
    Ok((hidden, mask))
}

/// The final hidden state [B, H] of each member's last token, for the members of `groups` in
/// order: [`suffix_hidden`] at the last position of each row, with the last layer's work after
/// attention run for those positions alone ([`Network::last_hidden`]).
pub fn suffix_last_hidden(
    network: &Network,
    seqs: &[Vec<u32>],
    groups: &[PrefixGroup],
    device: &Device,
) -> Result<Tensor> {
    let (mut cache, ids, mask) = prefix_then_suffixes(network, seqs, groups, device)?;
    network.last_hidden(&ids, &mask, &mut cache)
}

/// The cache after each group's shared prefix (one row per member), and the members' tokens
/// after it, right-padded, with their mask rows.
fn prefix_then_suffixes(
    network: &Network,
    seqs: &[Vec<u32>],
    groups: &[PrefixGroup],
    device: &Device,
) -> Result<(KvCache, Tensor, Vec<Vec<u32>>)> {
    if !network.is_decoder() {
        bail!("shared prefixes need a causal decoder (an encoder's tokens see what follows them)");
    }
    let mut cache = network.new_cache();
    cache.detached = true;
    if groups.iter().any(|g| g.shared > 0) {
        let prefixes: Vec<&[u32]> = groups
            .iter()
            .map(|g| &seqs[g.members[0]][..g.shared])
            .collect();
        let (ids, mask) = right_pad(&prefixes, device)?;
        network.hidden(&ids, &mask, &mut cache)?;
        let rows: Vec<usize> = groups
            .iter()
            .enumerate()
            .flat_map(|(g, group)| std::iter::repeat_n(g, group.members.len()))
            .collect();
        cache.select(&rows)?;
    }
    let mut suffixes: Vec<&[u32]> = Vec::new();
    for group in groups {
        for &i in &group.members {
            if seqs[i].len() <= group.shared {
                bail!(
                    "sequence {i} ({} tokens) has nothing after its shared prefix of {}",
                    seqs[i].len(),
                    group.shared
                );
            }
            suffixes.push(&seqs[i][group.shared..]);
        }
    }
    let (ids, mask) = right_pad(&suffixes, device)?;
    Ok((cache, ids, mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups_of(seqs: &[&[u32]], min_shared: usize) -> Vec<(usize, Vec<usize>)> {
        let seqs: Vec<Vec<u32>> = seqs.iter().map(|s| s.to_vec()).collect();
        group_by_prefix(&seqs, min_shared)
            .into_iter()
            .map(|g| (g.shared, g.members))
            .collect()
    }

    #[test]
    fn pairs_with_a_common_question_share_it() {
        let seqs: [&[u32]; 5] = [
            &[1, 2, 3, 4, 9],
            &[7, 7],
            &[1, 2, 3, 4, 8, 8],
            &[5, 6, 7, 1],
            &[5, 6, 7, 2],
        ];
        assert_eq!(
            groups_of(&seqs, 2),
            vec![(4, vec![2, 0]), (3, vec![3, 4]), (0, vec![1])]
        );
        // Below the minimum nothing is shared.
        assert_eq!(
            groups_of(&seqs, 4),
            vec![(4, vec![2, 0]), (0, vec![3]), (0, vec![4]), (0, vec![1])]
        );
    }

    #[test]
    fn a_member_keeps_a_token_and_duplicates_are_grouped() {
        // [1, 2] is a prefix of [1, 2, 3]: the shared part stops one token short of the shorter.
        assert_eq!(groups_of(&[&[1, 2, 3], &[1, 2]], 1), vec![(1, vec![1, 0])]);
        assert_eq!(
            groups_of(&[&[4, 4, 4], &[4, 4, 4], &[4, 4, 4]], 1),
            vec![(2, vec![0, 1, 2])]
        );
        // Single tokens share nothing.
        assert_eq!(
            groups_of(&[&[3], &[3]], 1),
            vec![(0, vec![0]), (0, vec![1])]
        );
        assert!(groups_of(&[], 1).is_empty());
    }

    #[test]
    fn a_member_that_would_lower_the_saving_starts_a_new_group() {
        // Two sequences sharing 3 tokens save 3; a third sharing 2 of them makes it 2 x 2 = 4.
        let a: &[u32] = &[1, 1, 1, 5];
        let b: &[u32] = &[1, 1, 1, 6];
        let c: &[u32] = &[1, 1, 9];
        assert_eq!(groups_of(&[a, b, c], 1), vec![(2, vec![0, 1, 2])]);
        let a: &[u32] = &[1, 1, 1, 1, 1, 1, 1, 5];
        let b: &[u32] = &[1, 1, 1, 1, 1, 1, 1, 6];
        // Sharing 7 between two, then 1 with a third: 2 x 1 = 2 < 7, so the third starts anew.
        let d: &[u32] = &[1, 2, 2];
        let groups = groups_of(&[a, b, d], 1);
        assert_eq!(groups, vec![(7, vec![0, 1]), (0, vec![2])]);
        let saved: usize = group_by_prefix(&[a.to_vec(), b.to_vec(), d.to_vec()], 1)
            .iter()
            .map(PrefixGroup::tokens_saved)
            .sum();
        assert_eq!(saved, 7);
    }
}
