//! Buffers whose first value lies at the start of a cache line (64 bytes), for the operands
//! of the tile kernels. A tile load reads 16 rows of 64 bytes; when the buffer starts
//! elsewhere (the allocator gives large buffers 16 bytes past a page), every row straddles
//! two lines, and on an Intel Xeon with AMX tile products with their loads from L1 ran 2.6x
//! slower (35-45 cycles per `tdpbsud` instead of 14; docs/results/inference.md, session 21).

use std::marker::PhantomData;
use std::mem::MaybeUninit;

/// One cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; LINE]);

/// Bytes per cache line.
pub const LINE: usize = 64;

/// Value types for which every bit pattern is a value (lines of bytes can hold them).
///
/// # Safety
/// Implement only for such types, with an alignment of at most 64.
pub unsafe trait Plain: Copy {}
// SAFETY: integers, every bit pattern valid.
unsafe impl Plain for u8 {}
// SAFETY: as above.
unsafe impl Plain for i8 {}
// SAFETY: as above.
unsafe impl Plain for u16 {}

/// A growable array of `T` starting on a cache line; like a `Vec<T>` with `len` values
/// initialized out of a capacity of whole lines.
pub struct Aligned<T: Plain> {
    lines: Vec<MaybeUninit<Line>>,
    len: usize,
    _values: PhantomData<T>,
}

impl<T: Plain> Aligned<T> {
    const PER_LINE: usize = LINE / std::mem::size_of::<T>();

    /// An empty buffer (no memory).
    pub const fn new() -> Self {
        Aligned {
            lines: Vec::new(),
            len: 0,
            _values: PhantomData,
        }
    }

    /// `len` copies of `v`.
    pub fn filled(len: usize, v: T) -> Self {
        let mut a = Self::new();
        a.reserve_total(len);
        for slot in &mut a.spare_capacity_mut()[..len] {
            slot.write(v);
        }
        // SAFETY: the first len values were written just above.
        unsafe { a.set_len(len) };
        a
    }

    /// Values the memory holds without growing.
    pub fn capacity(&self) -> usize {
        self.lines.len() * Self::PER_LINE
    }

    /// Drops the values (not the memory).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Memory for at least `total` values; the values kept (copied when it grows).
    pub fn reserve_total(&mut self, total: usize) {
        if total <= self.capacity() {
            return;
        }
        let lines = total.div_ceil(Self::PER_LINE);
        let mut grown: Vec<MaybeUninit<Line>> = Vec::with_capacity(lines);
        // SAFETY: MaybeUninit lines need no initialization.
        unsafe { grown.set_len(lines) };
        // SAFETY: both buffers hold at least len values; they do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.lines.as_ptr() as *const T,
                grown.as_mut_ptr() as *mut T,
                self.len,
            )
        };
        self.lines = grown;
    }

    /// The memory past the values (capacity - len of them), to be written before
    /// [`Self::set_len`].
    pub fn spare_capacity_mut(&mut self) -> &mut [MaybeUninit<T>] {
        let cap = self.capacity();
        // SAFETY: the lines hold cap values of T (T's alignment divides 64); len <= cap.
        unsafe {
            std::slice::from_raw_parts_mut(
                (self.lines.as_mut_ptr() as *mut MaybeUninit<T>).add(self.len),
                cap - self.len,
            )
        }
    }

    /// Sets the number of values.
    ///
    /// # Safety
    /// `len` <= capacity, and the first `len` values have been written.
    pub unsafe fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.capacity());
        self.len = len;
    }
}

impl<T: Plain> Default for Aligned<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Plain> Clone for Aligned<T> {
    fn clone(&self) -> Self {
        let mut a = Self::new();
        a.reserve_total(self.len);
        for (slot, &v) in a.spare_capacity_mut().iter_mut().zip(self.iter()) {
            slot.write(v);
        }
        // SAFETY: the len values were copied just above.
        unsafe { a.set_len(self.len) };
        a
    }
}

impl<T: Plain> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the first len values are initialized (set_len's contract); the pointer is
        // aligned for T, and not null even when empty (a Vec's dangling pointer is aligned).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Plain> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for deref, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_start_on_a_line_and_survive_growth() {
        let mut a = Aligned::<u16>::filled(100, 7);
        assert_eq!(a.as_ptr() as usize % LINE, 0);
        assert_eq!(a.len(), 100);
        assert!(a.iter().all(|&v| v == 7));
        assert_eq!(a.capacity(), 128); // 4 lines of 32 values
        a[3] = 9;
        a.reserve_total(1000);
        assert_eq!(a.as_ptr() as usize % LINE, 0);
        assert_eq!(a.len(), 100);
        assert_eq!((a[2], a[3], a[99]), (7, 9, 7));
        let b = a.clone();
        assert_eq!(&b[..], &a[..]);
        assert_eq!(b.as_ptr() as usize % LINE, 0);
        a.clear();
        assert!(a.is_empty() && a.capacity() >= 1000);
        let e = Aligned::<i8>::new();
        assert!(e.is_empty());
        assert_eq!(e.capacity(), 0);
    }

    #[test]
    fn spare_capacity_is_what_follows_the_values() {
        let mut a = Aligned::<i8>::filled(10, -1);
        a.reserve_total(200);
        let spare = a.spare_capacity_mut();
        assert_eq!(spare.len(), 256 - 10);
        for (i, s) in spare[..5].iter_mut().enumerate() {
            s.write(i as i8);
        }
        // SAFETY: 5 more values written.
        unsafe { a.set_len(15) };
        assert_eq!(&a[8..15], &[-1, -1, 0, 1, 2, 3, 4]);
    }
}
