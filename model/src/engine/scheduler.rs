//! The scheduler: which sequences run each step, over slot and page accounting alone
//! (no model, no tensors). The runner ([`super::runner`]) executes what it chose.
//!
//! - **Admission.** Waiting sequences enter the batch while slots and pages allow: a
//!   sequence takes one slot per sample it stands for (an unforked prompt counts its
//!   samples, at most `max_running`) and needs ⌈tokens / P⌉ pages for its tokens plus
//!   one per sample (room for the next token, or a fork's copy of the prompt's partial
//!   page); only its tokens' pages are taken now. Static batching admits only into an
//!   empty batch.
//! - **Growth and preemption.** Before a step, every decoding sequence whose next token
//!   starts a page gets a new page. When none is free, the most recently admitted
//!   running sequence is preempted (possibly the one that needs the page): its pages
//!   are freed and it returns to the queue with its tokens, which it recomputes when it
//!   is admitted again.
//! - **Planning.** Every decoding sequence feeds its one token each step; sequences
//!   being prefilled share `prefill_chunk` tokens, oldest first.
//! - **Fairness: first come, first served.** Admission takes the queue from its front
//!   and stops at the first sequence that does not fit, so a request never starts
//!   before an earlier one, however small it is; a preempted sequence goes back to the
//!   front of the queue, so it restarts before any request that has not started. Every
//!   sequence fits the empty cache alone ([`Scheduler::check_fits`] when it is added),
//!   so the head of the queue starts at the latest when the running sequences finish:
//!   no request waits behind an unbounded stream of later ones.
//!
//! Pages are reference-counted ([`PagePool`]): a prompt's samples share its full pages
//! ([`Scheduler::fork`]), and a page returns to the pool when its last holder finishes
//! or is preempted.
//!
//! A model with local (sliding-window) layers keeps their keys in a second pool
//! ([`super::local`]): before each step every running sequence gives back the local
//! pages its window has passed and takes those of the tokens it may feed, preempting
//! like growth when none is free.
//!
//! The prefix cache ([`super::prefix`]) keeps the full pages sequences computed: an
//! admitted sequence takes the longest cached prefix of its tokens (whole pages, never
//! its last token) and computes from there; its own pages are indexed as they fill.
//! Admission counts the cache's idle pages as available, and every page a sequence
//! needs is taken from the free ones first, then from the cache's least recently used
//! idle ones, so cached pages go before any running sequence is preempted. Models with
//! local layers cache nothing: a cached prefix would need the local layers' keys of
//! its last window too, which their pool gives back as the window passes.

use std::collections::{HashSet, VecDeque};

use rand_chacha::ChaCha8Rng;

use super::local::{LocalHold, LocalLayers, LocalPool, PoolSizes};
use super::pages::{self, PageCopy, PagePool};
use super::prefix::{self, page_hash, PrefixCache, WeightsKey, ROOT};
use super::{EngineConfig, EngineStats, StepOutput};
use crate::error::Result;

/// One sequence: a sample, or a prompt not yet forked into its samples.
#[derive(Debug)]
pub(crate) struct Seq {
    pub request: u64,
    /// The sample indices it stands for (several only before the fork).
    pub samples: Vec<usize>,
    /// One random stream per sample.
    pub rngs: Vec<ChaCha8Rng>,
    /// Prompt, then sampled tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    pub computed: usize,
    pub pages: Vec<u32>,
    /// Its pages of the local layers' pool (models with sliding windows).
    pub local: LocalHold,
    pub logprobs: Vec<f32>,
    pub tags: Vec<u64>,
    /// Per sampled token, the most likely tokens and their logprobs (empty unless the
    /// request asked for them: [`super::Engine::add_with_top_logprobs`]).
    pub tops: Vec<Vec<(u32, f32)>>,
    /// The prefix-cache hashes of its first full computed pages (the hash chain).
    pub hashes: Vec<u64>,
    /// The cache epoch (weights) it was admitted under: its pages are indexed only
    /// while it lasts.
    pub epoch: u64,
    /// Its tokens when it was admitted: those it computes below this are prefill.
    pub fresh: usize,
}

impl Seq {
    /// The prompt of `request` standing for `samples`, one random stream each, nothing
    /// computed yet.
    pub fn prompt(
        request: u64,
        prompt: &[u32],
        samples: Vec<usize>,
        rngs: Vec<ChaCha8Rng>,
    ) -> Self {
        Seq {
            request,
            samples,
            rngs,
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            computed: 0,
            pages: Vec::new(),
            local: LocalHold::default(),
            logprobs: Vec::new(),
            tags: Vec::new(),
            tops: Vec::new(),
            hashes: Vec::new(),
            epoch: 0,
            fresh: prompt.len(),
        }
    }

    /// Tokens whose keys and values are not in the cache yet.
    pub fn unfed(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Appends a sampled token with its logprob and the step's tag.
    pub fn push(&mut self, (token, logprob): (u32, f32), tag: u64) {
        self.tokens.push(token);
        self.logprobs.push(logprob);
        self.tags.push(tag);
    }
}

/// A sample forked from its prompt by [`Scheduler::fork`].
pub(crate) struct Fork {
    pub seq: Seq,
    /// The prompt's partly filled last page to copy into the fork's own last page:
    /// (from, to, tokens).
    pub copy: Option<PageCopy>,
    /// The same for its page of the local layers' pool.
    pub local_copy: Option<PageCopy>,
    /// Whether the fork holds every page of its tokens: false when no page was free for
    /// its copy of the partial page (it must be preempted, to recompute).
    pub whole: bool,
}

/// Which sequences run each step (see the module doc).
#[derive(Debug)]
pub(crate) struct Scheduler {
    max_running: usize,
    prefill_chunk: usize,
    continuous: bool,
    pool: PagePool,
    /// The local layers' pool, for a model that has local layers.
    local: Option<LocalPool>,
    /// The prefix cache over `pool` (off for models with local layers).
    cache: PrefixCache,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    stats: EngineStats,
}

impl Scheduler {
    /// An empty scheduler over ⌈kv_cache_tokens / kv_page_size⌉ free pages.
    #[cfg(test)]
    pub fn new(cfg: &EngineConfig) -> Self {
        Self::with_local(cfg, None)
    }

    /// An empty scheduler for a model with `local` layers (or none): the budget of
    /// ⌈kv_cache_tokens / kv_page_size⌉ pages of every layer shared out between the
    /// global and the local pool ([`PoolSizes::split`]), and a prefix cache of
    /// ⌊prefix_cache_tokens / kv_page_size⌋ idle pages (none with local layers).
    pub fn with_local(cfg: &EngineConfig, local: Option<LocalLayers>) -> Self {
        let ps = cfg.kv_page_size;
        let budget = cfg.kv_cache_tokens.div_ceil(ps);
        let (pool, local) = match local {
            None => (PagePool::new(budget, ps), None),
            Some(l) => {
                let sizes = PoolSizes::split(budget, l, (cfg.max_running, cfg.prefill_chunk, ps));
                (
                    PagePool::new(sizes.global, ps),
                    Some(LocalPool::new(sizes.local, ps, l.window)),
                )
            }
        };
        let cached = match local {
            Some(_) => 0,
            None => cfg.prefix_cache_tokens / ps,
        };
        Scheduler {
            max_running: cfg.max_running,
            prefill_chunk: cfg.prefill_chunk,
            continuous: cfg.continuous,
            pool,
            local,
            cache: PrefixCache::new(cached),
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: EngineStats::default(),
        }
    }

    pub fn pool(&self) -> &PagePool {
        &self.pool
    }
    pub fn local(&self) -> Option<&LocalPool> {
        self.local.as_ref()
    }
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }
    /// The running sequences, oldest admitted first.
    pub fn running(&self) -> &[Seq] {
        &self.running
    }
    pub fn running_mut(&mut self) -> &mut [Seq] {
        &mut self.running
    }

    /// Slots in use: the samples of every running sequence.
    pub fn running_slots(&self) -> usize {
        self.running.iter().map(|s| s.samples.len()).sum()
    }

    /// Requests none of whose sequences runs.
    pub fn queued_requests(&self) -> usize {
        let started: HashSet<u64> = self.running.iter().map(|s| s.request).collect();
        let mut queued: Vec<u64> = self
            .waiting
            .iter()
            .map(|s| s.request)
            .filter(|r| !started.contains(r))
            .collect();
        queued.dedup();
        queued.len()
    }

    /// Checks that a sequence of up to `longest` tokens can finish alone in the empty
    /// cache, and that a prompt of `prompt` tokens can fork into `group` samples: at
    /// most `capacity` pages, max(⌈longest / P⌉, ⌈prompt / P⌉ + group).
    pub fn check_fits(&self, prompt: usize, longest: usize, group: usize) -> Result<()> {
        let pool = &self.pool;
        let needed = pool.pages_for(longest).max(pool.pages_for(prompt) + group);
        if needed > pool.capacity() {
            return Err(pages::too_small(
                needed * pool.page_size(),
                pool.capacity(),
                pool.page_size(),
            ));
        }
        if let Some(l) = &self.local {
            let c = self.prefill_chunk;
            let needed = l.most_for(longest, c).max(l.most_for(prompt, c) + group);
            if needed > l.pool.capacity() {
                return Err(pages::too_small(
                    needed * l.pool.page_size(),
                    l.pool.capacity(),
                    l.pool.page_size(),
                ));
            }
        }
        Ok(())
    }

    /// Queues a sequence behind every waiting one.
    pub fn enqueue(&mut self, s: Seq) {
        self.stats.prompts += 1;
        self.waiting.push_back(s);
    }

    /// The weights the next step runs under: others than the last step's empty the
    /// prefix cache.
    pub fn set_weights(&mut self, key: WeightsKey) {
        self.cache.set_weights(key, &mut self.pool);
    }

    /// This step's work: trims the prefix cache to its bound, admits, grows
    /// (preempting where pages run out), admits again (preemption may have freed room)
    /// and returns [`Scheduler::plan`].
    pub fn schedule(&mut self) -> Vec<(usize, usize)> {
        self.cache.trim(&mut self.pool);
        self.admit();
        self.grow();
        self.admit();
        self.fit_local();
        self.plan()
    }

    /// Moves waiting sequences (oldest first) into the batch while slots and pages
    /// allow: a sequence needs pages for all its tokens plus one per sample, less the
    /// cached pages of its prefix, which it takes (the cache's idle pages count as
    /// available). Static batching admits only into an empty batch.
    fn admit(&mut self) {
        if !self.continuous && !self.running.is_empty() {
            return;
        }
        let ps = self.pool.page_size();
        while let Some(s) = self.waiting.front() {
            let slots = s.samples.len();
            let hit = self.cache.lookup(&s.tokens, ps);
            // Idle pages of its own prefix stop being available once it takes them.
            let idle_hit = hit.iter().filter(|&&(_, p)| self.pool.is_idle(p)).count();
            let pages = self.pool.pages_for(s.tokens.len()) - hit.len() + slots;
            // Its first chunk's local pages, and one per sample for the fork's copy.
            let local_short = self.local.as_ref().is_some_and(|l| {
                l.pool.pages_for(s.tokens.len().min(self.prefill_chunk)) + slots
                    > l.pool.free_pages()
            });
            if self.running_slots() + slots > self.max_running
                || pages > self.pool.available() - idle_hit
                || local_short
            {
                break;
            }
            let mut s = self.waiting.pop_front().expect("front exists");
            for &(h, p) in &hit {
                self.pool.share(p);
                s.pages.push(p);
                s.hashes.push(h);
            }
            self.cache.touch(&s.hashes);
            s.computed = hit.len() * ps;
            s.epoch = self.cache.epoch();
            s.fresh = s.tokens.len();
            self.stats.prefix_cache_hit_tokens += s.computed as u64;
            for _ in hit.len()..self.pool.pages_for(s.tokens.len()) {
                let p = prefix::alloc(&mut self.pool, &mut self.cache);
                s.pages.push(p.expect("available pages counted"));
            }
            self.running.push(s);
        }
    }

    /// Gives back a sequence's pages (and local pages); its cached prefix counts as
    /// used now.
    fn give_back(&mut self, s: &mut Seq) {
        if s.epoch == self.cache.epoch() {
            self.cache.touch(&s.hashes);
        }
        s.hashes.clear();
        self.pool.release(&s.pages);
        s.pages.clear();
        if let Some(l) = &mut self.local {
            l.release(&mut s.local);
        }
    }

    /// Returns a sequence's pages and queues it, first, to recompute its tokens.
    pub fn preempt(&mut self, mut s: Seq) {
        self.give_back(&mut s);
        s.computed = 0;
        self.stats.preemptions += 1;
        tracing::debug!(
            request = s.request,
            tokens = s.tokens.len(),
            "KV cache full: sequence preempted"
        );
        self.waiting.push_front(s);
    }

    /// Gives every decoding sequence whose next token starts a page a new page,
    /// preempting the most recently admitted sequences while none is free.
    fn grow(&mut self) {
        let ps = self.pool.page_size();
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if s.unfed() == 1 && s.computed == s.pages.len() * ps {
                match prefix::alloc(&mut self.pool, &mut self.cache) {
                    Some(p) => {
                        self.running[i].pages.push(p);
                        i += 1;
                    }
                    None => {
                        let victim = self.running.pop().expect("i < len");
                        self.preempt(victim);
                    }
                }
            } else {
                i += 1;
            }
        }
    }

    /// Fits every running sequence's local pages to the tokens it may feed this step
    /// (its next token, or up to a prefill chunk), preempting the most recently
    /// admitted sequences while the local pool has none free.
    fn fit_local(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let Some(l) = &mut self.local else { return };
            let s = &mut self.running[i];
            let feed = if s.unfed() == 1 {
                1
            } else {
                s.unfed().min(self.prefill_chunk)
            };
            let end = s.computed + feed;
            if l.fit(s, end) {
                i += 1;
            } else {
                let victim = self.running.pop().expect("i < len");
                self.preempt(victim);
            }
        }
    }

    /// This step's work: (running index, tokens to feed), by index. Every decoding
    /// sequence feeds its one token; prefilling ones share `prefill_chunk` tokens,
    /// oldest first.
    fn plan(&self) -> Vec<(usize, usize)> {
        let mut plan: Vec<(usize, usize)> = self
            .running
            .iter()
            .enumerate()
            .filter(|(_, s)| s.unfed() == 1)
            .map(|(i, _)| (i, 1))
            .collect();
        let mut budget = self.prefill_chunk;
        for (i, s) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if s.unfed() > 1 {
                let n = s.unfed().min(budget);
                budget -= n;
                plan.push((i, n));
            }
        }
        plan.sort_unstable();
        plan
    }

    /// The tokens `plan` feeds: (context, sampled). A sequence's tokens below its
    /// length at admission are context (its prompt, or what a preempted one
    /// recomputes), the others tokens it sampled.
    pub fn fed(&self, plan: &[(usize, usize)]) -> (usize, usize) {
        plan.iter().fold((0, 0), |(context, sampled), &(i, n)| {
            let s = &self.running[i];
            let c = (s.computed + n).min(s.fresh) - s.computed.min(s.fresh);
            (context + c, sampled + n - c)
        })
    }

    /// Marks the planned tokens computed (their keys and values are in the cache) and
    /// indexes the pages they filled in the prefix cache (unless the weights changed
    /// since the sequence was admitted: its pages are mixed).
    pub fn advance(&mut self, plan: &[(usize, usize)]) {
        let ps = self.pool.page_size();
        let Scheduler {
            running,
            pool,
            cache,
            ..
        } = self;
        for &(i, n) in plan {
            let s = &mut running[i];
            s.computed += n;
            if !cache.enabled() || s.epoch != cache.epoch() {
                continue;
            }
            while (s.hashes.len() + 1) * ps <= s.computed {
                let k = s.hashes.len();
                let parent = s.hashes.last().copied().unwrap_or(ROOT);
                let tokens = &s.tokens[k * ps..(k + 1) * ps];
                let h = page_hash(parent, tokens);
                cache.insert((h, parent), tokens, s.pages[k], pool);
                s.hashes.push(h);
            }
        }
    }

    /// Forks the unforked prompt at running index `i`, whose samples drew `picks`
    /// (one per sample), into its samples: the prompt keeps sample 0, and each other
    /// sample becomes a sequence with its drawn token that shares the prompt's full
    /// pages and takes a page of its own for the partly filled last one (which the
    /// caller copies now, while the prompt still holds it).
    pub fn fork(&mut self, i: usize, picks: &[(u32, f32)], tag: u64) -> Vec<Fork> {
        let ps = self.pool.page_size();
        let Scheduler {
            running,
            pool,
            local,
            cache,
            ..
        } = self;
        let s = &mut running[i];
        let full = s.tokens.len() / ps;
        let partial = s.tokens.len() % ps;
        let mut forks = Vec::with_capacity(picks.len().saturating_sub(1));
        for (j, &pick) in picks.iter().enumerate().skip(1) {
            let mut seq = Seq {
                request: s.request,
                samples: vec![s.samples[j]],
                rngs: vec![s.rngs[j].clone()],
                tokens: s.tokens.clone(),
                prompt_len: s.prompt_len,
                computed: s.computed,
                pages: s.pages[..full].to_vec(),
                local: LocalHold::default(),
                logprobs: Vec::new(),
                tags: Vec::new(),
                tops: Vec::new(),
                hashes: s.hashes.clone(),
                epoch: s.epoch,
                fresh: s.fresh,
            };
            seq.push(pick, tag);
            for &p in &seq.pages {
                pool.share(p);
            }
            let (mut copy, mut whole) = (None, true);
            if partial > 0 {
                match prefix::alloc(pool, cache) {
                    Some(p) => {
                        copy = Some((s.pages[full], p, partial));
                        seq.pages.push(p);
                    }
                    None => whole = false,
                }
            }
            let mut local_copy = None;
            if let Some(l) = local.as_mut().filter(|_| whole) {
                match l.fork(&s.local, s.tokens.len()) {
                    Some((hold, c)) => (seq.local, local_copy) = (hold, c),
                    None => whole = false,
                }
            }
            forks.push(Fork {
                seq,
                copy,
                local_copy,
                whole,
            });
        }
        s.samples.truncate(1);
        s.rngs.truncate(1);
        forks
    }

    /// Removes the running sequence at index `i` and frees its pages.
    pub fn finish(&mut self, i: usize) -> Seq {
        let mut s = self.running.remove(i);
        self.release(&mut s);
        s
    }

    /// Frees the pages of a sequence that is not running (a fork finished at once).
    pub fn release(&mut self, s: &mut Seq) {
        self.give_back(s);
    }

    /// Runs a fork that holds all its pages, after every running sequence.
    pub fn resume(&mut self, s: Seq) {
        self.running.push(s);
    }

    /// Counts a step that ran: its tokens and the peaks of pages and slots.
    pub fn record(&mut self, out: &StepOutput) {
        let st = &mut self.stats;
        st.steps += 1;
        st.decoded_tokens += out.decoded as u64;
        st.prefilled_tokens += out.prefilled as u64;
        st.peak_pages = st.peak_pages.max(self.pool.held_pages());
        st.prefix_cache_evictions = self.cache.evictions;
        if let Some(l) = &self.local {
            st.peak_local_pages = st.peak_local_pages.max(l.pool.used_pages());
        }
        st.peak_running = st.peak_running.max(out.running);
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    /// `max_running` slots, `pages` pages of `page_size` tokens, `prefill_chunk`.
    fn cfg(
        max_running: usize,
        pages: usize,
        page_size: usize,
        prefill_chunk: usize,
    ) -> EngineConfig {
        EngineConfig {
            max_running,
            kv_cache_tokens: pages * page_size,
            kv_page_size: page_size,
            prefill_chunk,
            prefix_cache_tokens: 0,
            ..EngineConfig::default()
        }
    }

    /// Request `request`'s prompt of `len` tokens, standing for `samples` samples.
    fn seq(request: u64, len: usize, samples: usize) -> Seq {
        let rngs = (0..samples)
            .map(|_| ChaCha8Rng::seed_from_u64(request))
            .collect();
        Seq::prompt(request, &vec![1; len], (0..samples).collect(), rngs)
    }

    fn requests(seqs: &[Seq]) -> Vec<u64> {
        seqs.iter().map(|s| s.request).collect()
    }

    /// One engine step without a model, as `Engine::step` drives the scheduler: the
    /// planned tokens are computed, every sequence whose tokens all are draws token 7 (an
    /// unforked prompt forks into its samples), and a sample with `max_new(request)` new
    /// tokens finishes. Returns the plan and the finished sequences.
    fn step(s: &mut Scheduler, max_new: impl Fn(u64) -> usize) -> (Vec<(usize, usize)>, Vec<Seq>) {
        let plan = s.schedule();
        s.advance(&plan);
        let (mut forks, mut done) = (Vec::new(), Vec::new());
        for &(i, _) in &plan {
            if s.running()[i].unfed() > 0 {
                continue;
            }
            let picks = vec![(7, 0.0); s.running()[i].samples.len()];
            if picks.len() > 1 {
                forks.extend(s.fork(i, &picks, 0));
            }
            let q = &mut s.running_mut()[i];
            q.push(picks[0], 0);
            if q.tokens.len() - q.prompt_len >= max_new(q.request) {
                done.push(i);
            }
        }
        let mut finished: Vec<Seq> = done.iter().rev().map(|&i| s.finish(i)).collect();
        for f in forks {
            if f.seq.tokens.len() - f.seq.prompt_len >= max_new(f.seq.request) {
                let mut seq = f.seq;
                s.release(&mut seq);
                finished.push(seq);
            } else if f.whole {
                s.resume(f.seq);
            } else {
                s.preempt(f.seq);
            }
        }
        (plan, finished)
    }

    /// Admission stops at `max_running` slots (an unforked prompt takes one per sample),
    /// and at the KV budget: a sequence needs its tokens' pages plus one per sample free.
    #[test]
    fn admits_up_to_max_running_and_the_kv_budget() {
        // Slots bind: 3 slots, 16 pages of 4; prompts of 5 tokens need 2 + 1 pages.
        let mut s = Scheduler::new(&cfg(3, 16, 4, 256));
        for r in 0..5 {
            s.enqueue(seq(r, 5, 1));
        }
        s.schedule();
        assert_eq!(requests(s.running()), [0, 1, 2]);
        assert_eq!(s.queued_requests(), 2);
        assert_eq!(s.pool().used_pages(), 6, "two pages per prompt of 5 tokens");

        // A group of 3 samples, unforked, fills the 3 slots alone.
        let mut s = Scheduler::new(&cfg(3, 16, 4, 256));
        s.enqueue(seq(0, 5, 3));
        s.enqueue(seq(1, 1, 1));
        s.schedule();
        assert_eq!(requests(s.running()), [0]);
        assert_eq!(s.running_slots(), 3);

        // Pages bind: 10 slots, 16 pages; prompts of 13 tokens need 4 + 1 pages, so three
        // are admitted (12 pages taken) and the fourth finds 4 < 5 free.
        let mut s = Scheduler::new(&cfg(10, 16, 4, 256));
        for r in 0..5 {
            s.enqueue(seq(r, 13, 1));
        }
        s.schedule();
        assert_eq!(requests(s.running()), [0, 1, 2]);
        assert_eq!(s.pool().used_pages(), 12);
        assert_eq!(s.queued_requests(), 2);
    }

    /// A decoding sequence whose next token starts a page, with no page free, preempts
    /// the most recently admitted sequence: its pages return to the pool, its tokens
    /// are kept and it waits first in the queue to recompute them.
    #[test]
    fn a_sequence_short_of_a_page_preempts_the_most_recently_admitted() {
        // 4 pages of 4 tokens; three prompts of 3 tokens take a page each.
        let mut s = Scheduler::new(&cfg(4, 4, 4, 256));
        for r in 0..3 {
            s.enqueue(seq(r, 3, 1));
        }
        step(&mut s, |_| 100); // prefill, then each draws its 4th token
        step(&mut s, |_| 100); // the 4th token fills each page; each draws a 5th
        assert_eq!(s.pool().free_pages(), 1);
        assert_eq!(s.stats().preemptions, 0);
        // Now all three need a page: 0 takes the free one, 1 preempts 2 and takes its.
        let plan = s.schedule();
        assert_eq!(requests(s.running()), [0, 1]);
        assert_eq!(plan, [(0, 1), (1, 1)]);
        assert_eq!(s.stats().preemptions, 1);
        assert_eq!(s.pool().free_pages(), 0);
        assert!(s.running().iter().all(|q| q.pages.len() == 2));
        let victim = s.waiting.front().expect("the preempted sequence waits");
        assert_eq!(victim.request, 2);
        assert_eq!((victim.computed, victim.pages.len()), (0, 0));
        assert_eq!(victim.tokens.len(), 5, "its sampled token is kept");

        // The most recent sequence short of a page, with none free, preempts itself.
        let mut s = Scheduler::new(&cfg(1, 4, 4, 256));
        s.enqueue(seq(0, 3, 1));
        step(&mut s, |_| 100);
        step(&mut s, |_| 100);
        while s.pool.alloc().is_some() {}
        assert!(s.schedule().is_empty());
        assert_eq!(s.stats().preemptions, 1);
        assert_eq!((s.running().len(), s.queued_requests()), (0, 1));
        assert_eq!(s.pool().free_pages(), 1, "its one page returned");
    }

    /// Pages return to the pool when their last holder finishes or is preempted; a
    /// prompt's full pages are shared by its samples (held once per sample), its partly
    /// filled last page copied into a page of each fork's own.
    #[test]
    fn pages_are_freed_on_finish_and_preemption_and_shared_pages_counted() {
        // A prompt of 6 tokens (pages: one full, one holding 2) with 3 samples.
        let mut s = Scheduler::new(&cfg(3, 12, 4, 256));
        s.enqueue(seq(0, 6, 3));
        let plan = s.schedule();
        assert_eq!(plan, [(0, 6)]);
        assert_eq!(s.pool().used_pages(), 2);
        s.advance(&plan);
        let forks = s.fork(0, &[(7, 0.0); 3], 0);
        let prompt = &s.running()[0];
        assert_eq!(prompt.samples, [0]);
        assert_eq!(forks.len(), 2);
        for (j, f) in forks.iter().enumerate() {
            assert_eq!(f.seq.samples, [j + 1]);
            assert_eq!(f.seq.tokens.len(), 7, "the fork holds its drawn token");
            assert_eq!(f.seq.pages[0], prompt.pages[0], "the full page is shared");
            let own = f.seq.pages[1];
            assert_eq!(f.copy, Some((prompt.pages[1], own, 2)));
            assert!(f.whole);
        }
        assert_eq!(
            s.pool().used_pages(),
            4,
            "one shared page, one partial, two copies"
        );
        for f in forks {
            s.resume(f.seq);
        }
        assert_eq!(s.running_slots(), 3);
        s.finish(0);
        assert_eq!(
            s.pool().used_pages(),
            3,
            "the shared page stays while forks hold it"
        );
        s.finish(0);
        assert_eq!(s.pool().used_pages(), 2);
        let last = s.running.pop().expect("one fork runs");
        s.preempt(last);
        assert_eq!(
            s.pool().used_pages(),
            0,
            "preemption frees the last holder's pages"
        );
        assert_eq!(s.pool().free_pages(), 12);

        // No page free for the copy: the fork holds only the shared pages, and
        // preempting it drops its holds while the prompt keeps them.
        let mut s = Scheduler::new(&cfg(2, 4, 4, 256));
        s.enqueue(seq(0, 6, 2));
        let plan = s.schedule();
        s.advance(&plan);
        while s.pool.alloc().is_some() {}
        let mut forks = s.fork(0, &[(7, 0.0); 2], 0);
        let f = forks.pop().expect("one fork");
        assert!(!f.whole && f.copy.is_none());
        assert_eq!(f.seq.pages, [s.running()[0].pages[0]]);
        s.preempt(f.seq);
        assert_eq!(s.pool().free_pages(), 0, "the prompt still holds its pages");
        s.finish(0);
        assert_eq!(s.pool().free_pages(), 2, "the prompt's two pages return");
    }

    /// First come, first served: a request that does not fit yet blocks the smaller ones
    /// behind it (they do not overtake it), and starts first once pages free up.
    #[test]
    fn a_waiting_request_is_not_overtaken_by_later_ones() {
        // 8 pages of 4. Request 0 (12 tokens) runs on 3; request 1 (24 tokens) needs
        // 6 + 1 > 5 free; requests 2.. (1 token) need 2 and would fit.
        let mut s = Scheduler::new(&cfg(8, 8, 4, 256));
        s.enqueue(seq(0, 12, 1));
        s.schedule();
        s.enqueue(seq(1, 24, 1));
        for r in 2..10 {
            s.enqueue(seq(r, 1, 1));
        }
        s.schedule();
        assert_eq!(requests(s.running()), [0]);
        assert_eq!(s.queued_requests(), 9);
        s.finish(0);
        s.schedule();
        assert_eq!(
            requests(s.running()),
            [1, 2],
            "1 first, then 2 in what is left"
        );
    }

    /// A preempted sequence restarts before a request that has not started.
    #[test]
    fn a_preempted_sequence_restarts_before_newer_requests() {
        let mut s = Scheduler::new(&cfg(4, 4, 4, 256));
        for r in 0..3 {
            s.enqueue(seq(r, 3, 1));
        }
        step(&mut s, |_| 100);
        step(&mut s, |_| 100);
        s.schedule(); // 2 is preempted (see above)
        s.enqueue(seq(3, 1, 1));
        s.finish(0);
        s.schedule();
        assert_eq!(
            requests(s.running()),
            [1],
            "2 needs 3 pages of 2: 3 waits behind it"
        );
        s.finish(0);
        s.schedule();
        assert_eq!(requests(s.running()), [2, 3]);
    }

    /// Over a long queue of mixed requests through a small cache (with preemptions),
    /// requests start in arrival order and every one finishes.
    #[test]
    fn a_long_queue_starts_requests_in_arrival_order() {
        let mut s = Scheduler::new(&cfg(6, 24, 4, 16));
        let n = 40;
        for r in 0..n {
            s.enqueue(seq(r, 1 + (r as usize * 7) % 13, 1 + r as usize % 3));
        }
        let max_new = |r: u64| 4 + (r as usize * 5) % 17;
        let mut started = vec![None; n as usize];
        let mut finished = vec![0; n as usize];
        for t in 0..100_000 {
            let (_, done) = step(&mut s, max_new);
            for q in s.running() {
                started[q.request as usize].get_or_insert(t);
            }
            for q in done {
                started[q.request as usize].get_or_insert(t);
                finished[q.request as usize] += 1;
            }
            if s.running().is_empty() && s.waiting.is_empty() {
                break;
            }
        }
        let samples = |r: usize| 1 + r % 3;
        for (r, &done) in finished.iter().enumerate() {
            assert_eq!(done, samples(r), "request {r}: samples finished");
        }
        let started: Vec<usize> = started.into_iter().map(|t| t.expect("started")).collect();
        assert!(
            started.windows(2).all(|w| w[0] <= w[1]),
            "start steps out of arrival order: {started:?}"
        );
        assert!(s.stats().preemptions > 0, "the cache never ran short");
        assert_eq!(s.pool().used_pages(), 0);
    }

    /// Every decoding sequence feeds its token each step; the prefill chunk goes to the
    /// oldest prefilling sequence first.
    #[test]
    fn prefill_goes_oldest_first_and_decoding_never_waits() {
        let mut s = Scheduler::new(&cfg(4, 32, 4, 8));
        s.enqueue(seq(0, 10, 1));
        s.enqueue(seq(1, 10, 1));
        assert_eq!(step(&mut s, |_| 100).0, [(0, 8)]);
        assert_eq!(step(&mut s, |_| 100).0, [(0, 2), (1, 6)]);
        assert_eq!(step(&mut s, |_| 100).0, [(0, 1), (1, 4)]);
        assert_eq!(step(&mut s, |_| 100).0, [(0, 1), (1, 1)]);
    }

    /// A finished sequence's full pages stay in the prefix cache, idle; a later request
    /// takes the whole pages of its prefix (never its last token) and computes only the
    /// rest; a running sequence's pages are found too, and stay its own.
    #[test]
    fn a_request_starts_from_the_cached_pages_of_earlier_ones() {
        let mut s = Scheduler::new(&EngineConfig {
            prefix_cache_tokens: 64,
            ..cfg(4, 16, 4, 256)
        });
        // Ten tokens of 1, then 7, 7, 7: 12 computed, three full pages indexed.
        s.enqueue(seq(0, 10, 1));
        while !s.running().is_empty() || !s.waiting.is_empty() {
            step(&mut s, |_| 3);
        }
        assert_eq!((s.pool().held_pages(), s.pool().idle_cached()), (0, 3));
        // Nine tokens of 1 then one more: two cached pages, two tokens to feed.
        s.enqueue(seq(1, 10, 1));
        assert_eq!(s.schedule(), [(0, 2)]);
        let q = &s.running()[0];
        assert_eq!((q.computed, q.pages.len()), (8, 3));
        assert_eq!(s.stats().prefix_cache_hit_tokens, 8);
        assert_eq!(
            s.pool().idle_cached(),
            1,
            "the third page is not its prefix"
        );
        // Exactly two pages of 1: the second is computed again for the last token's
        // logits. The first is shared with the running request.
        s.enqueue(seq(2, 8, 1));
        let plan = s.schedule();
        assert_eq!(plan, [(0, 2), (1, 4)]);
        let (a, b) = (&s.running()[0], &s.running()[1]);
        assert_eq!(a.pages[0], b.pages[0]);
        assert_ne!(a.pages[1], b.pages[1]);
        assert_eq!(s.stats().prefix_cache_hit_tokens, 12);
        assert_eq!(s.fed(&plan), (6, 0), "context only");
        assert_eq!(step(&mut s, |_| 3).0, plan);
        // Nine tokens of 1: two cached pages, its one other token fed as context beside
        // the others' sampled tokens.
        s.enqueue(seq(3, 9, 1));
        let plan = s.schedule();
        assert_eq!(plan, [(0, 1), (1, 1), (2, 1)]);
        assert_eq!(s.running()[2].computed, 8);
        assert_eq!(s.fed(&plan), (1, 2));
    }

    /// Admission counts the cache's idle pages as available and takes them, least
    /// recently used first, instead of preempting; pages a sequence holds stay.
    #[test]
    fn idle_cached_pages_are_taken_before_a_sequence_is_preempted() {
        let mut s = Scheduler::new(&EngineConfig {
            prefix_cache_tokens: 64,
            ..cfg(4, 8, 4, 256)
        });
        s.enqueue(seq(0, 17, 1));
        while !s.running().is_empty() || !s.waiting.is_empty() {
            step(&mut s, |_| 4);
        }
        // 20 computed: five pages idle, three free.
        assert_eq!((s.pool().idle_cached(), s.pool().free_pages()), (5, 3));
        // A prompt of 25 different tokens needs 7 + 1 pages: all of them.
        let rngs = vec![ChaCha8Rng::seed_from_u64(1)];
        s.enqueue(Seq::prompt(1, &[2; 25], vec![0], rngs));
        assert_eq!(s.schedule(), [(0, 25)]);
        assert_eq!(s.stats().preemptions, 0);
        assert_eq!(s.cache.evictions, 4);
        assert_eq!(s.pool().idle_cached(), 1);
    }

    /// Static batching admits only into an empty batch.
    #[test]
    fn static_batching_waits_for_the_batch_to_empty() {
        let mut s = Scheduler::new(&EngineConfig {
            continuous: false,
            ..cfg(4, 16, 4, 256)
        });
        s.enqueue(seq(0, 3, 1));
        s.schedule();
        s.enqueue(seq(1, 3, 1));
        s.schedule();
        assert_eq!(
            requests(s.running()),
            [0],
            "a free slot, but the batch is not empty"
        );
        s.finish(0);
        s.schedule();
        assert_eq!(requests(s.running()), [1]);
    }
}
