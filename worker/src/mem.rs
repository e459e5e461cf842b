//! Large, long-lived buffers on transparent huge pages: the packed weights
//! and the KV cache, which every step streams through.
//!
//! With 4 KiB pages, one decode step of the `base` preset touches some
//! 100,000 pages of weights, each a TLB miss, and in a virtual machine each
//! miss walks two page tables. With 2 MiB pages it touches about 200. Where
//! transparent huge pages are enabled only on request ("madvise", the
//! default of Debian and Ubuntu), memory gets them only if it asks, which
//! the allocator's `Vec`s never do; these buffers ask. Where they are
//! disabled ("never"), the request is ignored and nothing else changes.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use memmap2::MmapMut;

/// Size of a huge page (x86-64 and most aarch64 kernels).
const HUGE: usize = 2 << 20;

/// Plain-data element types for which all-zero bytes are a valid value, so
/// fresh anonymous pages are a buffer of zeros.
///
/// # Safety
/// Implementors must be `Copy`, have no padding and accept any all-zero bit
/// pattern as a value.
pub unsafe trait Zeroed: Copy + Send + Sync + 'static {}

// SAFETY: plain numbers, zero is 0 (or +0.0).
unsafe impl Zeroed for u8 {}
// SAFETY: as above.
unsafe impl Zeroed for f32 {}
// SAFETY: as above.
unsafe impl Zeroed for half::f16 {}
// SAFETY: as above.
unsafe impl Zeroed for half::bf16 {}

/// `len` elements of `T`, zeroed, in an anonymous mapping whose start is
/// aligned to a huge page and which asks for huge pages.
pub struct HugeBuf<T: Zeroed> {
    map: MmapMut,
    /// Bytes from the mapping's start to the aligned start of the buffer.
    offset: usize,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T: Zeroed> HugeBuf<T> {
    /// Panics, like `vec!`, when the memory cannot be had.
    pub fn zeroed(len: usize) -> Self {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .expect("buffer size overflows");
        // Small buffers gain nothing from huge pages; large ones are mapped
        // a huge page longer than needed, so that an aligned start lies
        // inside. The slack before it is never touched, so it costs
        // address space only.
        let huge = bytes >= HUGE;
        let slack = if huge { HUGE } else { 0 };
        let map = MmapMut::map_anon((bytes + slack).max(1))
            .unwrap_or_else(|e| panic!("cannot map {bytes} bytes: {e}"));
        let offset = if huge {
            let offset = (map.as_ptr() as usize).next_multiple_of(HUGE) - map.as_ptr() as usize;
            #[cfg(target_os = "linux")]
            // A refusal (THP compiled out, an old kernel) leaves small
            // pages, which work the same.
            let _ = map.advise_range(memmap2::Advice::HugePage, offset, bytes);
            offset
        } else {
            0
        };
        Self {
            map,
            offset,
            len,
            _elem: PhantomData,
        }
    }

    /// As [`zeroed`](Self::zeroed), with every page faulted in now, so that
    /// later writes never stop to clear memory. For the KV cache, which
    /// sequences otherwise touch a block at a time: its pages were cleared
    /// on the engine thread mid-step (4% of a base 16-stream run's samples
    /// while the pool warmed up), with the compute threads waiting. It also
    /// makes a pool that does not fit fail at start, not under load.
    pub fn resident(len: usize) -> Self {
        let mut buf = Self::zeroed(len);
        buf.populate();
        buf
    }

    /// Faults every page in, by writing back a byte of each.
    fn populate(&mut self) {
        const PAGE: usize = 4096;
        // SAFETY: the buffer's bytes, all initialized (T is plain data
        // without padding, see `Zeroed`), borrowed through `&mut self`.
        let bytes: &mut [u8] = unsafe {
            std::slice::from_raw_parts_mut(
                self.as_mut_ptr() as *mut u8,
                self.len * std::mem::size_of::<T>(),
            )
        };
        // On all threads: in a VM a first touch can also wait for the host
        // to back the memory, and the threads' faults overlap.
        let parts: Vec<&mut [u8]> = bytes.chunks_mut(HUGE).collect();
        crate::pool::run_parts(parts, |part| {
            for at in (0..part.len()).step_by(PAGE) {
                // SAFETY: `at` is inside the part. Volatile, so that the
                // store is kept: it writes back the byte it read, and the
                // write is the point.
                unsafe {
                    let p = part.as_mut_ptr().add(at);
                    p.write_volatile(p.read_volatile());
                }
            }
        });
    }
}

impl<T: Zeroed> Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the mapping holds `offset + len·size_of::<T>()` bytes,
        // readable and writable, page-aligned (so aligned for T) plus a
        // multiple of a page; T accepts all-zero bytes and every write went
        // through a `&mut [T]`.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(self.offset) as *const T, self.len)
        }
    }
}

impl<T: Zeroed> DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only view.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.map.as_mut_ptr().add(self.offset) as *mut T,
                self.len,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_zeroed_and_keep_what_is_written() {
        for len in [0, 1, 1000, HUGE / 4 + 3, 3 * HUGE / 4] {
            let mut b = HugeBuf::<f32>::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&v| v == 0.0));
            for (i, v) in b.iter_mut().enumerate() {
                *v = i as f32;
            }
            assert!(b.iter().enumerate().all(|(i, &v)| v == i as f32));
        }
        let mut b = HugeBuf::<f32>::zeroed(HUGE);
        b[0] = 1.5;
        b.populate();
        assert_eq!(b[0], 1.5);
        assert_eq!(b.iter().filter(|&&v| v != 0.0).count(), 1);
        let r = HugeBuf::<half::bf16>::resident(HUGE + 5);
        assert_eq!(r.len(), HUGE + 5);
        assert!(r.iter().all(|&v| v == half::bf16::ZERO));
    }

    #[test]
    fn large_buffers_start_on_a_huge_page() {
        let b = HugeBuf::<half::bf16>::zeroed(HUGE);
        assert_eq!(b.as_ptr() as usize % HUGE, 0);
        let small = HugeBuf::<u8>::zeroed(100);
        assert_eq!(small.as_ptr() as usize % 4096, 0);
    }
}
