//! Buffers sized by a caller's request (sample counts, batch sizes, probe counts): a request
//! that cannot be met is an `Error`, never the allocator aborting the host process.
use crate::{Error, Result};

/// `buf.resize(len, T::default())`, reserving first so that a failed allocation is `err()`.
pub(crate) fn resize<T: Clone + Default>(buf: &mut Vec<T>, len: usize, err: impl FnOnce() -> Error) -> Result<()> {
    if len > buf.len() {
        buf.try_reserve_exact(len - buf.len()).map_err(|_| err())?;
    }
    buf.resize(len, T::default());
    Ok(())
}

/// A vector of `T::default()` whose length is the product of `dims`; `err()` when the product
/// overflows, exceeds `isize::MAX` bytes, or cannot be allocated.
pub(crate) fn zeroed<T: Clone + Default>(dims: &[usize], err: impl Fn() -> Error) -> Result<Vec<T>> {
    let len = dims.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d));
    let len = len.filter(|l| *l <= isize::MAX as usize / std::mem::size_of::<T>().max(1)).ok_or_else(&err)?;
    let mut buf = Vec::new();
    resize(&mut buf, len, err)?;
    Ok(buf)
}
