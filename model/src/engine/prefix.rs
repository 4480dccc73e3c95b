//! The prefix cache: the KV pages of earlier sequences, found again by their tokens, so
//! that a request starts from its longest cached prefix (whole pages) and computes
//! only the rest: a conversation's next turn prefills only its new tokens, and
//! separate requests for one prompt share its prefill.
//!
//! - **Keys.** A full page is named by a hash chain, as vLLM's automatic prefix caching
//!   names its blocks: hᵢ = hash(hᵢ₋₁, the page's P token ids), h₋₁ a fixed root, so
//!   hᵢ names the whole prefix up to the page's end (its positions included: a prefix
//!   always starts at position 0). Each entry keeps its page's tokens and its parent's
//!   hash and a lookup compares both, so a page is reused only after the same tokens
//!   under the same (hashed) prefix. Pages are indexed as they fill (a full page never
//!   changes), so a request can also start from the pages of one still running.
//! - **The weights.** Every entry was computed under the weights the cache is keyed on
//!   ([`WeightsKey`]: the identity and `generation` of the model's parameter store and
//!   of its trainable one, a LoRA adapter's); any new version, full or adapter, empties
//!   the cache, and a sequence that ran across the change (its pages mixed) indexes
//!   none of its pages ([`PrefixCache::epoch`]).
//! - **Never the last token.** A sequence takes at most ⌊(n − 1) / P⌋ pages of its n
//!   tokens: its last token is always fed, so the step that feeds it gives the logits
//!   it samples from (a fully cached prompt recomputes its last page, or only its last
//!   token when that starts a page).
//! - **Eviction.** The cache holds each indexed page once ([`PagePool::cache`]); a page
//!   no sequence holds is idle. At most `limit` idle pages are kept (`[generator]
//!   prefix_cache_tokens` / P), the least recently used given back first, and when a
//!   sequence needs a page and none is free an idle one is given back before any
//!   running sequence is preempted. A page some sequence holds is never freed: the
//!   cache drops only its own hold. A prefix's deeper pages count as used less recently
//!   than its first ones, so eviction shortens prefixes from their ends.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use super::pages::PagePool;

/// The weights keys and values were computed under: (store identity, generation) of
/// the model's parameters and of its trainable parameters (the same store without an
/// adapter). See [`crate::params::ParamStore::identity`].
pub(crate) type WeightsKey = [(usize, u64); 2];

/// The hash before a sequence's first page.
pub(crate) const ROOT: u64 = 0x7a6d_5eed_0f5e_9b17;

/// The hash of a full page of `tokens` after the prefix hashed as `parent`.
pub(crate) fn page_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug)]
struct Entry {
    page: u32,
    parent: u64,
    tokens: Box<[u32]>,
    tick: u64,
}

/// The index of cached pages (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct PrefixCache {
    /// Idle pages kept at most; 0 = no caching.
    limit: usize,
    weights: Option<WeightsKey>,
    epoch: u64,
    entries: HashMap<u64, Entry>,
    /// Entries by last use (tick → hash), least recent first.
    lru: BTreeMap<u64, u64>,
    tick: u64,
    /// Pages given back (for room, or to stay within `limit`).
    pub evictions: u64,
}

impl PrefixCache {
    /// A cache keeping at most `limit` idle pages (0: off).
    pub fn new(limit: usize) -> Self {
        PrefixCache {
            limit,
            ..Default::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.limit > 0
    }

    /// Bumped whenever the weights change: a sequence indexes its pages only while
    /// the epoch it was admitted in lasts.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Pages indexed (idle or held by sequences).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Keys the cache on `key`: weights other than the last ones empty it and start a
    /// new epoch.
    pub fn set_weights(&mut self, key: WeightsKey, pool: &mut PagePool) {
        if self.weights == Some(key) {
            return;
        }
        for (_, e) in self.entries.drain() {
            pool.uncache(e.page);
        }
        self.lru.clear();
        self.weights = Some(key);
        self.epoch += 1;
    }

    /// The longest cached prefix of `tokens` in whole pages, never its last token:
    /// (hash, page) of each of its first ⌊(n − 1) / P⌋ pages that are cached, in order.
    pub fn lookup(&self, tokens: &[u32], page_size: usize) -> Vec<(u64, u32)> {
        let mut hit = Vec::new();
        if !self.enabled() || tokens.is_empty() {
            return hit;
        }
        let mut chain = ROOT;
        for page in tokens[..tokens.len() - 1].chunks_exact(page_size) {
            let h = page_hash(chain, page);
            match self.entries.get(&h) {
                Some(e) if e.parent == chain && *e.tokens == *page => hit.push((h, e.page)),
                _ => break,
            }
            chain = h;
        }
        hit
    }

    /// Marks the prefix hashed as `chain` (its pages in order) used now, its deeper
    /// pages less recently than its first ones.
    pub fn touch(&mut self, chain: &[u64]) {
        for h in chain.iter().rev() {
            if let Some(e) = self.entries.get_mut(h) {
                self.lru.remove(&e.tick);
                self.tick += 1;
                e.tick = self.tick;
                self.lru.insert(self.tick, *h);
            }
        }
    }

    /// Indexes `page`, holding `tokens` after the prefix hashed as `parent`, under
    /// `hash`, unless a page is indexed there already (another sequence computed the
    /// same prefix).
    pub fn insert(
        &mut self,
        (hash, parent): (u64, u64),
        tokens: &[u32],
        page: u32,
        pool: &mut PagePool,
    ) {
        if !self.enabled() || self.entries.contains_key(&hash) {
            return;
        }
        pool.cache(page);
        self.tick += 1;
        self.lru.insert(self.tick, hash);
        self.entries.insert(
            hash,
            Entry {
                page,
                parent,
                tokens: tokens.into(),
                tick: self.tick,
            },
        );
    }

    /// Gives back the least recently used idle page; false when none is idle. An entry
    /// passed over because a sequence holds its page counts as used now (it is).
    pub fn evict(&mut self, pool: &mut PagePool) -> bool {
        if pool.idle_cached() == 0 {
            return false;
        }
        for _ in 0..self.lru.len() {
            let Some((tick, hash)) = self.lru.pop_first() else {
                return false;
            };
            let e = self.entries.get_mut(&hash).expect("indexed");
            if pool.is_idle(e.page) {
                let page = e.page;
                self.entries.remove(&hash);
                pool.uncache(page);
                self.evictions += 1;
                return true;
            }
            debug_assert_eq!(tick, e.tick);
            self.tick += 1;
            e.tick = self.tick;
            self.lru.insert(self.tick, hash);
        }
        false
    }

    /// Gives back idle pages, least recently used first, until at most `limit` are
    /// idle.
    pub fn trim(&mut self, pool: &mut PagePool) {
        while pool.idle_cached() > self.limit {
            if !self.evict(pool) {
                break;
            }
        }
    }
}

/// A free page of `pool`, giving back the cache's least recently used idle page when
/// none is free; `None` when neither is.
pub(crate) fn alloc(pool: &mut PagePool, cache: &mut PrefixCache) -> Option<u32> {
    pool.alloc()
        .or_else(|| cache.evict(pool).then(|| pool.alloc()).flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Indexes `tokens`' full pages as one sequence computing them on fresh pages
    /// would; returns the pages and their hashes.
    fn index(c: &mut PrefixCache, pool: &mut PagePool, tokens: &[u32]) -> (Vec<u32>, Vec<u64>) {
        let ps = pool.page_size();
        let (mut pages, mut hashes) = (Vec::new(), Vec::new());
        for page in tokens.chunks_exact(ps) {
            let parent = hashes.last().copied().unwrap_or(ROOT);
            let h = page_hash(parent, page);
            let p = pool.alloc().unwrap();
            c.insert((h, parent), page, p, pool);
            pages.push(p);
            hashes.push(h);
        }
        (pages, hashes)
    }

    /// A prefix is found page by page up to its first difference, never its last
    /// token; a page after another prefix is not found.
    #[test]
    fn lookups_follow_the_chain_and_leave_the_last_token() {
        let mut pool = PagePool::new(8, 4);
        let mut c = PrefixCache::new(8);
        let tokens: Vec<u32> = (0..12).collect();
        let (pages, _) = index(&mut c, &mut pool, &tokens);
        pool.release(&pages);
        assert_eq!(pool.idle_cached(), 3);
        let found = |t: &[u32]| -> Vec<u32> { c.lookup(t, 4).iter().map(|h| h.1).collect() };
        assert_eq!(found(&tokens), pages[..2], "the last token is fed");
        assert_eq!(found(&(0..13).collect::<Vec<_>>()), pages);
        assert_eq!(found(&(0..9).collect::<Vec<_>>()), pages[..2]);
        assert_eq!(found(&(0..8).collect::<Vec<_>>()), pages[..1]);
        let mut other: Vec<u32> = (0..13).collect();
        other[5] = 99;
        assert_eq!(
            found(&other),
            pages[..1],
            "stops at the first different page"
        );
        // The second page's tokens after another first page: not the same prefix.
        let shifted: Vec<u32> = [vec![7; 4], (4..13).collect()].concat();
        assert!(found(&shifted).is_empty());
    }

    /// Idle pages go least recently used first, a prefix's deeper pages before its
    /// first; held pages are never freed; new weights empty the index.
    #[test]
    fn eviction_frees_idle_pages_only_and_new_weights_empty_the_cache() {
        let mut pool = PagePool::new(6, 2);
        let mut c = PrefixCache::new(2);
        let key = |g| [(1, g), (1, g)];
        c.set_weights(key(0), &mut pool);
        let (a, ha) = index(&mut c, &mut pool, &[1, 2, 3, 4]);
        let (b, _) = index(&mut c, &mut pool, &[5, 6, 7, 8]);
        pool.release(&a); // a finished; b still runs
        c.touch(&ha);
        assert_eq!((pool.idle_cached(), pool.free_pages()), (2, 2));
        assert!(c.evict(&mut pool));
        assert_eq!(
            c.lookup(&[1, 2, 3, 4, 0], 2).len(),
            1,
            "the deeper page went"
        );
        assert!(c.evict(&mut pool));
        assert!(!c.evict(&mut pool), "b's pages are held");
        assert_eq!((pool.free_pages(), c.len()), (4, 2));
        // b finishes: its pages are idle; three idle pages trimmed to the limit of 2.
        pool.release(&b);
        let (d, _) = index(&mut c, &mut pool, &[9, 9]);
        pool.release(&d);
        assert_eq!(pool.idle_cached(), 3);
        c.trim(&mut pool);
        assert_eq!(pool.idle_cached(), 2);
        // A sequence holds d's page; new weights drop every entry, the page stays held.
        pool.share(d[0]);
        c.set_weights(key(1), &mut pool);
        assert_eq!((c.len(), pool.idle_cached(), pool.held_pages()), (0, 0, 1));
        assert!(c.lookup(&[9, 9, 0], 2).is_empty());
        pool.release(&d);
        assert_eq!(pool.free_pages(), 6);
        // Free pages first, then the cache's idle ones.
        let (e, _) = index(&mut c, &mut pool, &[1, 1, 2, 2]);
        pool.release(&e);
        let taken: Vec<u32> = (0..6).map_while(|_| alloc(&mut pool, &mut c)).collect();
        assert_eq!(taken.len(), 6);
        assert_eq!(c.evictions, 5);
    }
}
