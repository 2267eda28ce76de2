//! Plumbing shared by every entry point: the panic boundary, the thread-local
//! last-error message, and checked access to caller memory (pointers, lengths,
//! and structs that start with `struct_size`).
use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::pf_status;
use crate::{Error, ErrorKind, Result};

thread_local! {
    /// The message of this thread's last failing call (empty until one fails).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Record `message` as this thread's last error. Never panics.
pub(crate) fn set_last_error(message: &str) {
    let bytes: Vec<u8> = message.bytes().map(|b| if b == 0 { b'?' } else { b }).collect();
    let c = CString::new(bytes).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut slot) = slot.try_borrow_mut() {
            *slot = c;
        }
    });
}

/// This thread's last error message; the pointer stays valid until the next failing call on this thread.
pub(crate) fn last_error_ptr() -> *const c_char {
    static EMPTY: &[u8] = b"\0";
    LAST_ERROR
        .try_with(|slot| match slot.try_borrow() {
            Ok(s) => s.as_ptr(),
            Err(_) => EMPTY.as_ptr().cast(),
        })
        .unwrap_or(EMPTY.as_ptr().cast())
}

pub(crate) fn status_of(kind: ErrorKind) -> pf_status {
    match kind {
        ErrorKind::InvalidArgument => pf_status::PF_ERR_INVALID_ARGUMENT,
        ErrorKind::Io => pf_status::PF_ERR_IO,
        ErrorKind::Bundle => pf_status::PF_ERR_BUNDLE,
        ErrorKind::Runtime => pf_status::PF_ERR_RUNTIME,
        ErrorKind::Numeric => pf_status::PF_ERR_NUMERIC,
        ErrorKind::Unsupported => pf_status::PF_ERR_UNSUPPORTED,
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Run the body of entry point `name`: a panic becomes `PF_ERR_PANIC`, an error
/// becomes its status, and both leave a message prefixed with `name`.
pub(crate) fn guard(name: &str, body: impl FnOnce() -> Result<()>) -> pf_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => pf_status::PF_OK,
        Ok(Err(e)) => {
            set_last_error(&format!("{name}: {}", e.message()));
            status_of(e.kind())
        }
        Err(payload) => {
            // Formatting the payload could itself panic (a panicking Display); keep that inside too.
            let text = catch_unwind(AssertUnwindSafe(|| panic_text(&*payload))).unwrap_or_default();
            set_last_error(&format!("{name}: internal panic (a bug in postflow): {text}"));
            pf_status::PF_ERR_PANIC
        }
    }
}

/// A non-NULL, aligned pointer, or an error naming `what`.
pub(crate) fn non_null<T>(p: *const T, what: &str) -> Result<()> {
    if p.is_null() {
        return Err(Error::invalid(format!("{what} is NULL")));
    }
    if (p as usize) % std::mem::align_of::<T>() != 0 {
        return Err(Error::invalid(format!("{what} is not aligned to {} bytes", std::mem::align_of::<T>())));
    }
    Ok(())
}

/// `a * b`, or an error when it overflows.
pub(crate) fn mul(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b)
        .filter(|n| n.checked_mul(4).is_some_and(|bytes| bytes <= isize::MAX as usize))
        .ok_or_else(|| Error::invalid(format!("{what} = {a} x {b} is too large")))
}

/// An input array: non-NULL and holding exactly `need` elements.
///
/// # Safety
/// When non-NULL, `p` must point to `len` readable, initialised `f32`s.
pub(crate) unsafe fn input<'a>(p: *const f32, len: usize, need: usize, name: &str, shape: &str) -> Result<&'a [f32]> {
    non_null(p, name)?;
    if len != need {
        return Err(Error::invalid(format!("{name}_len is {len}, but {shape} needs exactly {need}")));
    }
    // SAFETY: `p` is non-NULL and aligned (checked above), and the caller guarantees it points to
    // `len` readable floats; `need * 4 <= isize::MAX` was checked by `mul`.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// An output array (when wanted): NULL, or aligned with room for `need` elements.
pub(crate) fn output_len(p: *const f32, len: usize, need: usize, name: &str, shape: &str) -> Result<()> {
    if p.is_null() {
        return Ok(());
    }
    non_null(p, name)?;
    if len < need {
        return Err(Error::invalid(format!("{name}_len is {len}, too small: {shape} needs {need}")));
    }
    Ok(())
}

/// Copy at most `count` values of `src` into the caller's buffer `dst` (already
/// checked by [`output_len`] to hold `count` floats); a NULL `dst` is skipped.
///
/// # Safety
/// `dst` is NULL or points to at least `count` writable floats.
pub(crate) unsafe fn write_out(dst: *mut f32, count: usize, src: impl Iterator<Item = f32>) {
    if dst.is_null() {
        return;
    }
    for (i, v) in src.take(count).enumerate() {
        // SAFETY: i < count and `dst` has room for `count` floats (caller contract, checked by `output_len`).
        unsafe { dst.add(i).write(v) };
    }
}

/// The `struct_size` of a caller's struct of type `T`, checked to lie in `[min, size_of::<T>()]`.
///
/// # Safety
/// When non-NULL, `p` must point to at least `struct_size` readable bytes whose
/// first four bytes are the `uint32_t struct_size`.
pub(crate) unsafe fn struct_size<T>(p: *const T, name: &str, type_name: &str, min: usize) -> Result<usize> {
    non_null(p, name)?;
    // SAFETY: non-NULL and aligned for T (so for u32, T's first field); the caller owns at least these 4 bytes.
    let size = unsafe { p.cast::<u32>().read() } as usize;
    let full = std::mem::size_of::<T>();
    if size == 0 {
        return Err(Error::invalid(format!(
            "{name}->struct_size is 0: set it to sizeof({type_name}) (the pf_*_default/init functions do this)"
        )));
    }
    if size < min {
        return Err(Error::invalid(format!(
            "{name}->struct_size is {size}, smaller than the oldest {type_name} layout ({min} bytes)"
        )));
    }
    if size > full {
        return Err(Error::invalid(format!(
            "{name}->struct_size is {size}, larger than this library's {type_name} ({full} bytes): \
             the caller was built against a newer postflow.h than the library (version {})",
            env!("CARGO_PKG_VERSION")
        )));
    }
    Ok(size)
}

/// Read field `$field` (of type `$ty`) of the caller's `*const $T` when `$size`
/// (the struct_size) covers it; `None` otherwise. Never touches bytes past `$size`.
macro_rules! get_field {
    ($p:expr, $size:expr, $T:ty, $field:ident: $ty:ty) => {{
        // Type-check that the field has type $ty (never called).
        let _check = |s: &$T| -> $ty { s.$field };
        let off = std::mem::offset_of!($T, $field);
        if off + std::mem::size_of::<$ty>() <= $size {
            // SAFETY: the caller's struct has at least `$size` readable bytes (struct_size contract) and is
            // aligned for $T, so this field, which lies entirely within them, is readable and aligned. The field
            // is read as its declared plain type ($ty: integers, floats or pointers; every bit pattern is valid).
            Some(unsafe { ($p as *const u8).add(off).cast::<$ty>().read() })
        } else {
            None
        }
    }};
}

/// Write `$value` into field `$field` of the caller's `*mut $T` when `$size` covers it.
macro_rules! put_field {
    ($p:expr, $size:expr, $T:ty, $field:ident: $ty:ty = $value:expr) => {{
        let _check = |s: &mut $T, v: $ty| s.$field = v;
        let off = std::mem::offset_of!($T, $field);
        if off + std::mem::size_of::<$ty>() <= $size {
            let v: $ty = $value;
            // SAFETY: as in `get_field!`: the field lies within the caller's `$size` writable, aligned bytes.
            unsafe { ($p as *mut u8).add(off).cast::<$ty>().write(v) };
        }
    }};
}

pub(crate) use {get_field, put_field};
