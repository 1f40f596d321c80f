//! The prefix cache: copies of the KV rows of recently finished sequences,
//! keyed by their token ids and kept within a memory budget (least recently
//! used out first), so that a prompt that starts with a cached prefix (the
//! next turn of a conversation, a shared system prompt) only reads the rest.
//! An index of hashed block-aligned prefixes finds the longest cached prefix
//! of a prompt without comparing it against every entry.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tch::{TchError, Tensor};

use super::kv_cache::KvCache;
use super::stats::Stats;

/// Tokens per indexed block. A prefix is found a block at a time, then
/// extended token by token inside the best entry; a prompt shares at least
/// one whole block with an entry to reuse it.
pub const BLOCK: usize = 16;

type EntryId = u64;

/// One finished sequence's prefix.
struct Entry {
    /// The tokens whose keys and values `kv` holds, position by position.
    tokens: Vec<u32>,
    /// How many of `tokens` were the prompt (the rest were generated).
    prompt_len: usize,
    /// Every layer's keys, then every layer's values:
    /// `[2 * layers, kv_heads, tokens.len(), head_dim]`, on the model's device.
    kv: Tensor,
    bytes: u64,
    /// `block_hashes(tokens)`, the index keys to remove with the entry.
    hashes: Vec<u64>,
    /// Position in the LRU order (a larger tick is more recent).
    tick: u64,
}

/// Where a prompt's cached prefix is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    entry: EntryId,
    /// Leading tokens the prompt shares with the entry.
    matched: usize,
    /// Leading tokens copied into the slot: `matched`, but at least one
    /// prompt token is left to read (its logits give the first token).
    pub reused: usize,
}

/// One model's prefix cache (one per engine: entries never cross models).
pub struct PrefixCache {
    /// Bytes of tensors the entries may hold; 0 turns the cache off.
    budget: u64,
    bytes: u64,
    entries: HashMap<EntryId, Entry>,
    /// Hash of `tokens[..k * BLOCK]` → the entries that start with it.
    index: HashMap<u64, Vec<EntryId>>,
    /// Tick → entry, oldest first.
    lru: BTreeMap<u64, EntryId>,
    next_id: EntryId,
    clock: u64,
    stats: Arc<Stats>,
}

impl PrefixCache {
    /// A cache holding at most `budget` bytes of keys and values (0 = off).
    pub fn new(budget: u64, stats: Arc<Stats>) -> Self {
        Self {
            budget,
            bytes: 0,
            entries: HashMap::new(),
            index: HashMap::new(),
            lru: BTreeMap::new(),
            next_id: 0,
            clock: 0,
            stats,
        }
    }

    /// Leading tokens of `prompt` that [`resume`](Self::resume) would copy
    /// now; 0 when nothing is cached for it (or the cache is off).
    pub fn reusable(&self, prompt: &[u32]) -> usize {
        if self.budget == 0 || prompt.len() <= 1 {
            return 0;
        }
        self.longest_prefix(prompt)
            .map_or(0, |(_, matched)| matched.min(prompt.len() - 1))
    }

    /// Counts a prompt started without a cached prefix (while the cache is on).
    pub fn record_miss(&self) {
        if self.budget > 0 {
            Stats::add(&self.stats.prefix_misses, 1);
        }
    }

    /// Finds the longest cached prefix of `prompt` and copies its keys and
    /// values into positions `0..hit.reused` of `slot`. None when nothing is
    /// cached for it (or the cache is off).
    pub fn resume(
        &mut self,
        prompt: &[u32],
        cache: &mut KvCache,
        slot: usize,
    ) -> Result<Option<Hit>, TchError> {
        if self.budget == 0 {
            return Ok(None);
        }
        let found = self.longest_prefix(prompt);
        let Some((entry, matched)) = found.filter(|_| prompt.len() > 1) else {
            Stats::add(&self.stats.prefix_misses, 1);
            return Ok(None);
        };
        let hit = Hit {
            entry,
            matched,
            reused: matched.min(prompt.len() - 1),
        };
        self.touch(entry);
        cache.copy_in(slot, &self.entries[&entry].kv, hit.reused)?;
        Stats::add(&self.stats.prefix_hits, 1);
        Stats::add(&self.stats.prefix_tokens_reused, hit.reused as u64);
        Ok(Some(hit))
    }

    /// Keeps the keys and values of a finished sequence: `tokens` are in
    /// positions `0..tokens.len()` of `slot`, the first `prompt_len` of them
    /// its prompt; `resumed` is where its prompt's prefix came from. Older
    /// entries make room (least recently used first); an entry this one
    /// extends, or whose whole prompt it repeated (the previous turn of its
    /// conversation), is dropped, as its rows are in this one.
    pub fn store(
        &mut self,
        cache: &KvCache,
        slot: usize,
        tokens: &[u32],
        prompt_len: usize,
        resumed: Option<Hit>,
    ) {
        if self.budget == 0 || tokens.len() < BLOCK {
            return;
        }
        if let Some(hit) = resumed {
            let superseded = self
                .entries
                .get(&hit.entry)
                .is_some_and(|e| hit.matched >= e.prompt_len);
            if superseded {
                self.remove(hit.entry);
            }
        }
        if let Some((id, matched)) = self.longest_prefix(tokens) {
            if matched == tokens.len() {
                // Every row is cached already.
                self.touch(id);
                return;
            }
            if matched == self.entries[&id].tokens.len() {
                self.remove(id);
            }
        }
        let bytes = cache.bytes_per_token() * tokens.len() as u64;
        if bytes > self.budget {
            return;
        }
        while self.bytes + bytes > self.budget {
            let Some((_, &oldest)) = self.lru.iter().next() else {
                break;
            };
            self.remove(oldest);
            Stats::add(&self.stats.prefix_evictions, 1);
        }
        let kv = match cache.copy_out(slot, tokens.len()) {
            Ok(kv) => kv,
            Err(e) => {
                // Out of memory, most likely: the cache just keeps less.
                tracing::warn!(error = %e, tokens = tokens.len(), "prefix not cached");
                return;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let hashes: Vec<u64> = block_hashes(tokens).collect();
        for &h in &hashes {
            self.index.entry(h).or_default().push(id);
        }
        self.clock += 1;
        self.lru.insert(self.clock, id);
        self.entries.insert(
            id,
            Entry {
                tokens: tokens.to_vec(),
                prompt_len,
                kv,
                bytes,
                hashes,
                tick: self.clock,
            },
        );
        self.bytes += bytes;
        self.publish();
    }

    /// The entry sharing the most leading tokens with `tokens` (at least one
    /// block), and how many it shares; ties go to the most recently used.
    fn longest_prefix(&self, tokens: &[u32]) -> Option<(EntryId, usize)> {
        let mut candidates = None;
        let mut blocks = 0;
        // An entry that shares k blocks shares every shorter prefix too, so
        // the first block no entry has ends the search.
        for (k, h) in block_hashes(tokens).enumerate() {
            match self.index.get(&h) {
                Some(ids) => {
                    candidates = Some(ids);
                    blocks = k + 1;
                }
                None => break,
            }
        }
        let start = blocks * BLOCK;
        let (id, extra) = candidates?
            .iter()
            .filter_map(|id| {
                let entry = &self.entries[id];
                // Shorter only after a hash collision.
                let rest = entry.tokens.get(start..)?;
                Some((*id, common_prefix(rest, &tokens[start..]), entry.tick))
            })
            .max_by_key(|&(_, extra, tick)| (extra, tick))
            .map(|(id, extra, _)| (id, extra))?;
        // Hashes can collide: the winner's blocks are compared for real.
        (self.entries[&id].tokens[..start] == tokens[..start]).then_some((id, start + extra))
    }

    fn touch(&mut self, id: EntryId) {
        if let Some(entry) = self.entries.get_mut(&id) {
            self.lru.remove(&entry.tick);
            self.clock += 1;
            entry.tick = self.clock;
            self.lru.insert(self.clock, id);
        }
    }

    fn remove(&mut self, id: EntryId) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        self.lru.remove(&entry.tick);
        for h in &entry.hashes {
            if let Some(ids) = self.index.get_mut(h) {
                ids.retain(|&other| other != id);
                if ids.is_empty() {
                    self.index.remove(h);
                }
            }
        }
        self.bytes -= entry.bytes;
        self.publish();
    }

    /// Copies the size counters into the engine's stats.
    fn publish(&self) {
        self.stats.prefix_bytes.store(self.bytes, Relaxed);
        self.stats
            .prefix_entries
            .store(self.entries.len() as u64, Relaxed);
    }
}

/// Hashes of `tokens[..BLOCK]`, `tokens[..2 * BLOCK]`, ... (whole blocks
/// only), each computed from the previous one and the next block.
fn block_hashes(tokens: &[u32]) -> impl Iterator<Item = u64> + '_ {
    let mut previous = 0u64;
    tokens.chunks_exact(BLOCK).map(move |block| {
        // SipHash with fixed keys: the same ids give the same hash.
        let mut hasher = DefaultHasher::new();
        previous.hash(&mut hasher);
        block.hash(&mut hasher);
        previous = hasher.finish();
        previous
    })
}

/// How many leading elements `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    const LAYERS: usize = 2;
    const KV_HEADS: usize = 2;
    const HEAD_DIM: usize = 4;
    const CONTEXT: usize = 128;

    fn kv_cache(slots: usize) -> KvCache {
        KvCache::new(
            LAYERS,
            slots,
            KV_HEADS,
            CONTEXT,
            HEAD_DIM,
            Device::Cpu,
            Kind::Float,
        )
        .unwrap()
    }

    /// Fills `slot` with values that encode the token at each position, the
    /// way a model's keys depend on the tokens before them.
    fn fill(cache: &mut KvCache, slot: usize, tokens: &[u32]) {
        let t = tokens.len() as i64;
        let ids: Vec<f32> = tokens.iter().map(|&id| id as f32).collect();
        let rows = Tensor::from_slice(&ids)
            .view([1, 1, t, 1])
            .expand([1, KV_HEADS as i64, t, HEAD_DIM as i64], false)
            .contiguous();
        for layer in 0..LAYERS {
            let k = &rows + layer as f64;
            let v = &rows - layer as f64;
            cache.write_prompts(layer, slot, 0, &k, &v).unwrap();
        }
    }

    /// The token ids `slot` holds in positions `0..len`, read back from
    /// every layer's keys and values (which must agree).
    fn read(cache: &KvCache, slot: usize, len: usize) -> Vec<u32> {
        let mut out = None;
        for layer in 0..LAYERS {
            let (k, v) = cache.slot_view(layer, slot, len as i64).unwrap();
            let k = Vec::<f32>::try_from(&(k - layer as f64).flatten(0, -1)).unwrap();
            let v = Vec::<f32>::try_from(&(v + layer as f64).flatten(0, -1)).unwrap();
            assert_eq!(k, v);
            // Head 0's rows; every head holds the same.
            let ids: Vec<u32> = k.chunks(HEAD_DIM).take(len).map(|c| c[0] as u32).collect();
            if let Some(prev) = &out {
                assert_eq!(prev, &ids);
            }
            out = Some(ids);
        }
        out.unwrap()
    }

    fn tokens(start: u32, n: usize) -> Vec<u32> {
        (start..start + n as u32).collect()
    }

    fn stats() -> Arc<Stats> {
        Arc::new(Stats::default())
    }

    /// Stores `tokens` as a finished sequence (prompt: all but the last 4).
    fn finish(prefix: &mut PrefixCache, cache: &mut KvCache, tokens: &[u32]) {
        fill(cache, 0, tokens);
        prefix.store(cache, 0, tokens, tokens.len().saturating_sub(4), None);
    }

    #[test]
    fn a_prompt_reuses_its_longest_cached_prefix_and_reads_at_least_one_token() {
        let s = stats();
        let mut cache = kv_cache(2);
        let mut prefix = PrefixCache::new(1 << 20, s.clone());
        let a = tokens(100, 40);
        finish(&mut prefix, &mut cache, &a);

        // The entry and more: all of the entry is reused.
        let mut longer = a.clone();
        longer.extend([7, 8, 9]);
        let hit = prefix.resume(&longer, &mut cache, 1).unwrap().unwrap();
        assert_eq!(hit.reused, 40);
        assert_eq!(read(&cache, 1, 40), a);

        // The entry itself: its last token is read again for its logits.
        let hit = prefix.resume(&a, &mut cache, 1).unwrap().unwrap();
        assert_eq!((hit.matched, hit.reused), (40, 39));

        // Diverging inside the third block: a prefix of the entry, not a
        // multiple of the block size.
        let mut branch = a[..37].to_vec();
        branch.extend([1, 2, 3, 4, 5]);
        let hit = prefix.resume(&branch, &mut cache, 1).unwrap().unwrap();
        assert_eq!(hit.reused, 37);
        assert_eq!(read(&cache, 1, 37), a[..37].to_vec());

        // Less than one block in common, or a different first token: no hit.
        let mut short = a[..BLOCK - 1].to_vec();
        short.extend(tokens(900, 30));
        assert!(prefix.resume(&short, &mut cache, 1).unwrap().is_none());
        assert!(prefix
            .resume(&tokens(101, 40), &mut cache, 1)
            .unwrap()
            .is_none());
        assert_eq!(Stats::get(&s.prefix_hits), 3);
        assert_eq!(Stats::get(&s.prefix_misses), 2);
        assert_eq!(Stats::get(&s.prefix_tokens_reused), 40 + 39 + 37);
    }

    #[test]
    fn the_entry_sharing_most_tokens_wins() {
        let mut cache = kv_cache(2);
        let mut prefix = PrefixCache::new(1 << 20, stats());
        let system = tokens(500, 2 * BLOCK);
        let mut a = system.clone();
        a.extend(tokens(10, 20));
        let mut b = system.clone();
        b.extend(tokens(60, 20));
        finish(&mut prefix, &mut cache, &a);
        finish(&mut prefix, &mut cache, &b);

        let mut next_a = a.clone();
        next_a.extend([1, 2]);
        let hit = prefix.resume(&next_a, &mut cache, 1).unwrap().unwrap();
        assert_eq!(hit.reused, a.len());
        assert_eq!(read(&cache, 1, a.len()), a);

        // Only the shared system prompt: either entry serves it.
        let mut other = system.clone();
        other.extend([3, 3, 3]);
        let hit = prefix.resume(&other, &mut cache, 1).unwrap().unwrap();
        assert_eq!(hit.reused, system.len());
        assert_eq!(read(&cache, 1, system.len()), system);
    }

    #[test]
    fn a_full_cache_evicts_the_least_recently_used() {
        let s = stats();
        let mut cache = kv_cache(2);
        let per_entry = cache.bytes_per_token() * 32;
        let mut prefix = PrefixCache::new(3 * per_entry + per_entry / 2, s.clone());
        let prompts: Vec<Vec<u32>> = (0..8).map(|i| tokens(1000 * (i + 1), 32)).collect();
        for (i, p) in prompts.iter().enumerate() {
            finish(&mut prefix, &mut cache, p);
            if i >= 1 {
                // Keep the first one in use: it must survive.
                let mut next = prompts[0].clone();
                next.push(1);
                let hit = prefix.resume(&next, &mut cache, 1).unwrap();
                assert_eq!(hit.map(|h| h.reused), Some(32));
            }
            assert!(Stats::get(&s.prefix_bytes) <= 3 * per_entry + per_entry / 2);
        }
        assert_eq!(Stats::get(&s.prefix_entries), 3);
        assert_eq!(Stats::get(&s.prefix_bytes), 3 * per_entry);
        assert_eq!(Stats::get(&s.prefix_evictions), 5);
        // The newest two and the one in use are left.
        for (i, p) in prompts.iter().enumerate() {
            let cached = prefix.resume(p, &mut cache, 1).unwrap().is_some();
            assert_eq!(cached, matches!(i, 0 | 6 | 7), "prompt {i}");
        }
        // An entry larger than the whole budget is not kept.
        let mut tiny = PrefixCache::new(per_entry - 1, stats());
        finish(&mut tiny, &mut cache, &prompts[0]);
        assert!(tiny.entries.is_empty());
    }

    #[test]
    fn the_next_turn_replaces_the_entry_it_continues() {
        let s = stats();
        let mut cache = kv_cache(2);
        let mut prefix = PrefixCache::new(1 << 20, s.clone());
        // Turn 1: a prompt of 30 tokens and 6 generated.
        let turn1 = tokens(200, 36);
        fill(&mut cache, 0, &turn1);
        prefix.store(&cache, 0, &turn1, 30, None);
        // Turn 2 repeats the whole first prompt, then the answer as the
        // client re-tokenized it (different from the 34th token on).
        let mut prompt2 = turn1[..33].to_vec();
        prompt2.extend(tokens(700, 20));
        let hit = prefix.resume(&prompt2, &mut cache, 1).unwrap().unwrap();
        assert_eq!(hit.reused, 33);
        let mut turn2 = prompt2.clone();
        turn2.extend([5, 6, 7]);
        fill(&mut cache, 1, &turn2);
        prefix.store(&cache, 1, &turn2, prompt2.len(), Some(hit));
        assert_eq!(Stats::get(&s.prefix_entries), 1, "turn 1 is superseded");

        // A client sharing only part of turn 2's prompt keeps it.
        let mut other = turn2[..20].to_vec();
        other.extend(tokens(3000, 20));
        let hit = prefix.resume(&other, &mut cache, 0).unwrap().unwrap();
        assert_eq!(hit.reused, 20);
        fill(&mut cache, 0, &other);
        prefix.store(&cache, 0, &other, other.len() - 2, Some(hit));
        assert_eq!(Stats::get(&s.prefix_entries), 2);

        // A sequence that is a prefix of an entry adds nothing; one that
        // extends an entry replaces it.
        fill(&mut cache, 0, &turn2[..30]);
        prefix.store(&cache, 0, &turn2[..30], 20, None);
        assert_eq!(Stats::get(&s.prefix_entries), 2);
        let mut extended = other.clone();
        extended.extend([9; 10]);
        fill(&mut cache, 0, &extended);
        prefix.store(&cache, 0, &extended, other.len(), None);
        assert_eq!(Stats::get(&s.prefix_entries), 2);
        let per_token = cache.bytes_per_token();
        assert_eq!(
            Stats::get(&s.prefix_bytes),
            per_token * (turn2.len() + extended.len()) as u64
        );
    }

    #[test]
    fn an_off_cache_keeps_nothing_and_counts_nothing() {
        let s = stats();
        let mut cache = kv_cache(1);
        let mut prefix = PrefixCache::new(0, s.clone());
        let a = tokens(1, 40);
        finish(&mut prefix, &mut cache, &a);
        assert!(prefix.resume(&a, &mut cache, 0).unwrap().is_none());
        assert_eq!(Stats::get(&s.prefix_misses), 0);
        assert_eq!(Stats::get(&s.prefix_entries), 0);
    }

    #[test]
    fn block_hashes_depend_on_every_earlier_token() {
        let a = tokens(0, 3 * BLOCK);
        let mut b = a.clone();
        b[0] = 99;
        let ha: Vec<u64> = block_hashes(&a).collect();
        let hb: Vec<u64> = block_hashes(&b).collect();
        assert_eq!(ha.len(), 3);
        assert!(ha.iter().zip(&hb).all(|(x, y)| x != y));
        let prefix: Vec<u64> = block_hashes(&a[..2 * BLOCK + 5]).collect();
        assert_eq!(prefix, ha[..2]);
    }
}
