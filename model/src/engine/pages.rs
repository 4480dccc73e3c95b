//! The paged KV cache: every layer's keys and values live in one pool of fixed-size
//! pages, and a sequence owns a list of pages (its block table) instead of a row of
//! `max length` slots. Memory is bounded by the tokens in flight, pages are shared by
//! reference count (a group's prompt, prefilled once, is read by all its samples), and
//! a sequence that cannot get a page waits or is preempted, never runs out of memory.
//!
//! Token `t` of a sequence with pages `p` lives at slot `p[t / P] · P + t mod P`
//! (P = page size) of every layer's (slots, KV·D) key and value tensors.

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// A partly filled page's copy for a fork: (from, to, the tokens it holds).
pub type PageCopy = (u32, u32, usize);

/// Which pages are free and how many holders each page has: sequences, and the
/// prefix cache (`prefix.rs`), which holds each page it indexes once.
#[derive(Debug)]
pub struct PagePool {
    page_size: usize,
    refs: Vec<u32>,
    free: Vec<u32>,
    /// Whether the prefix cache holds the page.
    cached: Vec<bool>,
    /// Cached pages no sequence holds (the cache's hold is their only one): the cache
    /// gives them back on demand.
    idle: usize,
}

impl PagePool {
    /// `pages` pages of `page_size` tokens, all free.
    pub fn new(pages: usize, page_size: usize) -> Self {
        PagePool {
            page_size,
            refs: vec![0; pages],
            // Popped from the end: low page ids first.
            free: (0..pages as u32).rev().collect(),
            cached: vec![false; pages],
            idle: 0,
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }
    pub fn capacity(&self) -> usize {
        self.refs.len()
    }
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }
    /// Pages not free: held by sequences or by the prefix cache.
    pub fn used_pages(&self) -> usize {
        self.capacity() - self.free_pages()
    }
    /// Cached pages that no sequence holds (given back when a page is needed).
    pub fn idle_cached(&self) -> usize {
        self.idle
    }
    /// Pages some sequence holds.
    pub fn held_pages(&self) -> usize {
        self.used_pages() - self.idle
    }
    /// Pages a sequence can get: the free ones and the idle cached ones.
    pub fn available(&self) -> usize {
        self.free_pages() + self.idle
    }
    /// Whether `page` is cached and held by no sequence.
    pub fn is_idle(&self, page: u32) -> bool {
        self.cached[page as usize] && self.refs[page as usize] == 1
    }

    /// Pages needed to hold `tokens` tokens: ⌈tokens / P⌉.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }

    /// A free page, now held once; `None` when the pool is exhausted.
    pub fn alloc(&mut self) -> Option<u32> {
        let p = self.free.pop()?;
        self.refs[p as usize] = 1;
        Some(p)
    }

    /// One more holder of `page` (a forked sequence sharing it, a sequence starting
    /// from a cached prefix).
    pub fn share(&mut self, page: u32) {
        let p = page as usize;
        debug_assert!(self.refs[p] > 0, "sharing a free page");
        if self.cached[p] && self.refs[p] == 1 {
            self.idle -= 1;
        }
        self.refs[p] += 1;
    }

    /// Drops one hold of each page; a page nobody holds returns to the pool.
    pub fn release(&mut self, pages: &[u32]) {
        for &p in pages {
            let r = &mut self.refs[p as usize];
            debug_assert!(*r > 0, "releasing a free page");
            *r -= 1;
            if *r == 0 {
                debug_assert!(!self.cached[p as usize], "the cache's hold released");
                self.free.push(p);
            } else if *r == 1 && self.cached[p as usize] {
                self.idle += 1;
            }
        }
    }

    /// The prefix cache takes its hold of `page` (held by the sequence that computed it).
    pub fn cache(&mut self, page: u32) {
        debug_assert!(!self.cached[page as usize], "cached twice");
        self.share(page);
        self.cached[page as usize] = true;
    }

    /// The prefix cache drops its hold of `page`: freed if no sequence holds it.
    pub fn uncache(&mut self, page: u32) {
        let p = page as usize;
        debug_assert!(self.cached[p], "not cached");
        if self.refs[p] == 1 {
            self.idle -= 1;
        }
        self.cached[p] = false;
        self.release(&[page]);
    }

    /// The slot of token `t` of a sequence holding `pages`.
    pub fn slot(&self, pages: &[u32], t: usize) -> u32 {
        pages[t / self.page_size] * self.page_size as u32 + (t % self.page_size) as u32
    }
}

/// Every layer's key and value pool, (slots, KV·D) each: the global layers' over the
/// global pool's slots, the local (sliding-window) layers' over the local pool's.
#[derive(Debug)]
pub struct KvPages {
    pub(crate) layers: Vec<(Tensor, Tensor)>,
    /// Whether layer l keeps its keys in the local pool.
    local: Vec<bool>,
}

impl KvPages {
    /// Pools of `slots` = (global, local) token slots for the layers of `cfg`: views
    /// of one allocation per kind, which the OS zeroes lazily on CPU (a large zeroed
    /// allocation is mapped, not written), so untouched pages cost no resident memory.
    /// Without a local pool (0 local slots) every layer uses the global one.
    pub fn new(
        cfg: &ModelConfig,
        (slots, local_slots): (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let width = cfg.num_key_value_heads * cfg.head_dim;
        let n = cfg.num_hidden_layers;
        let local: Vec<bool> = (0..n)
            .map(|l| local_slots > 0 && cfg.window_of(l).is_some())
            .collect();
        let n_local = local.iter().filter(|&&l| l).count();
        let global_all = Tensor::zeros((n - n_local, 2, slots, width), dtype, device)?;
        let local_all = Tensor::zeros((n_local, 2, local_slots, width), dtype, device)?;
        let (mut g, mut lo) = (0, 0);
        let layers = local
            .iter()
            .map(|&is_local| {
                let layer = if is_local {
                    lo += 1;
                    local_all.get(lo - 1)?
                } else {
                    g += 1;
                    global_all.get(g - 1)?
                };
                Ok((layer.get(0)?, layer.get(1)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvPages { layers, local })
    }

    /// Whether layer `l`'s keys live in the local pool.
    pub fn is_local(&self, l: usize) -> bool {
        self.local.get(l).copied().unwrap_or(false)
    }

    /// Bytes of KV memory in use at `global` pages of the global pool and `local` of
    /// the local one (local layers keep theirs in the local pool).
    pub fn bytes_in_pages(
        cfg: &ModelConfig,
        dtype: DType,
        page_size: usize,
        (global, local): (usize, usize),
    ) -> usize {
        let per_layer =
            2 * cfg.num_key_value_heads * cfg.head_dim * dtype.size_in_bytes() * page_size;
        let n_local = super::local::LocalLayers::of(cfg).map_or(0, |l| l.local);
        per_layer * (global * (cfg.num_hidden_layers - n_local) + local * n_local)
    }

    /// Writes rows of k and v (N, KV·D) of `layer` at `slots` (N·KV·D indices, each
    /// row's slot repeated across its columns, as `scatter_set` takes them).
    pub fn write(&self, layer: usize, slots: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        let (kp, vp) = &self.layers[layer];
        kp.scatter_set(slots, &k.contiguous()?, 0)?;
        vp.scatter_set(slots, &v.contiguous()?, 0)?;
        Ok(())
    }

    /// Copies the first `tokens` slots of page `from` into page `to` in every layer of
    /// the global pool, or of the local one when `local` (a forked sequence's private
    /// copy of a partly filled shared page). Only those rows are read (a gather),
    /// never the pool's whole allocation.
    pub fn copy_page(
        &self,
        (from, to, tokens): PageCopy,
        page_size: usize,
        local: bool,
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let Some((first, _)) = self.layers.first() else {
            return Ok(());
        };
        let src = from as usize * page_size;
        let idx: Vec<u32> = (src..src + tokens).map(|i| i as u32).collect();
        let idx = Tensor::from_vec(idx, tokens, first.device())?;
        let dst = to as usize * page_size;
        for (l, (k, v)) in self.layers.iter().enumerate() {
            if self.is_local(l) != local {
                continue;
            }
            for t in [k, v] {
                t.slice_set(&t.index_select(&idx, 0)?, 0, dst)?;
            }
        }
        Ok(())
    }
}

/// `[generator] kv_cache_tokens` is too small for one sequence.
pub(crate) fn too_small(needed: usize, pages: usize, page_size: usize) -> Error {
    Error::invalid(format!(
        "a sequence of {needed} tokens needs more than the KV cache's {} tokens: raise [generator] kv_cache_tokens",
        pages * page_size
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_return_when_their_last_holder_releases_them() {
        let mut pool = PagePool::new(3, 4);
        let a = pool.alloc().unwrap();
        let b = pool.alloc().unwrap();
        pool.share(a);
        assert_eq!(pool.free_pages(), 1);
        pool.release(&[a, b]);
        assert_eq!(pool.free_pages(), 2, "a is still held once");
        pool.release(&[a]);
        assert_eq!(pool.free_pages(), 3);
        assert_eq!(pool.pages_for(9), 3);
        assert_eq!(pool.slot(&[2, 0], 5), 1);
        let _ = (pool.alloc(), pool.alloc(), pool.alloc());
        assert!(pool.alloc().is_none(), "an exhausted pool says so");
    }

    /// A cached page is idle while only the cache holds it, and free once the cache
    /// drops it too.
    #[test]
    fn cached_pages_count_as_idle_when_no_sequence_holds_them() {
        let mut pool = PagePool::new(4, 4);
        let a = pool.alloc().unwrap();
        pool.cache(a);
        assert_eq!((pool.idle_cached(), pool.held_pages()), (0, 1));
        pool.share(a); // a second sequence
        pool.release(&[a]);
        assert_eq!(pool.idle_cached(), 0, "still held by a sequence");
        pool.release(&[a]);
        assert!(pool.is_idle(a));
        assert_eq!((pool.idle_cached(), pool.held_pages()), (1, 0));
        assert_eq!((pool.free_pages(), pool.available()), (3, 4));
        pool.share(a); // a sequence starts from the cached page
        assert_eq!(pool.idle_cached(), 0);
        pool.uncache(a);
        assert_eq!(pool.free_pages(), 3, "the sequence still holds it");
        pool.release(&[a]);
        assert_eq!((pool.free_pages(), pool.idle_cached()), (4, 0));
    }
}
