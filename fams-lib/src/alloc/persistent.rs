//! Which types may live in the heap: the [`Persistent`] marker trait and its fingerprints.

use std::marker::PhantomData;
use std::num::{
    NonZeroI16, NonZeroI32, NonZeroI64, NonZeroI8, NonZeroU16, NonZeroU32, NonZeroU64, NonZeroU8, NonZeroUsize,
    Wrapping,
};

/// A type whose values may be stored in a persistent heap and read back by a later process.
///
/// # Safety
///
/// Implement it only for a type whose every value, copied byte for byte into the heap, is still
/// a valid value of the type when read by **another process of the same program** after a
/// restart. That rules out any field that refers to something outside the heap or to
/// something that exists only in one process:
///
/// - no references (`&T`, `&mut T`, `&'static str`) and no raw pointers outside the heap;
/// - no `Box`, `Vec`, `String`, `HashMap`… of the global allocator (their buffers are in the
///   process's own heap): use [`PBox`](super::PBox), [`PVec`](super::PVec),
///   [`PHashMap`](super::PHashMap) instead, whose allocator is the heap's;
/// - no `Rc`, `Arc`, `Cell` of them, no file descriptors, sockets, thread or process handles,
///   no function pointers or trait objects (code addresses change between runs);
/// - no `std::collections::HashMap` even in the heap: its `RandomState` differs per process.
///
/// Pointers *into the same heap* stay valid (the heap is mapped at the same address in every
/// run), which is what makes `PVec` and `PHashMap` sound; pointers into *another* heap do not
/// (it may not be mapped next time): never move a collection of one heap into another.
///
/// [`FINGERPRINT`](Persistent::FINGERPRINT) must change whenever the type's layout or meaning
/// changes: a root whose recorded fingerprint differs from the type it is opened as is refused,
/// instead of being read as the wrong type. The [`persistent!`](crate::persistent) macro
/// derives it from the struct's definition and its fields' fingerprints, and checks that every
/// field is `Persistent`; prefer it to a hand-written `unsafe impl`.
pub unsafe trait Persistent {
    /// A hash of the type's definition; see [`fingerprint`] and [`fingerprint_combine`].
    const FINGERPRINT: u64;
}

/// FNV-1a of `bytes`: a fingerprint of a type name or definition, usable in a `const`.
pub const fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

/// Mix two fingerprints, order-sensitively.
pub const fn fingerprint_combine(a: u64, b: u64) -> u64 {
    let mut x = a ^ b.wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_add(a << 6).wrapping_add(a >> 2);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

macro_rules! plain {
    ($($t:ty),*) => {$(
        // SAFETY: plain data: no pointers, no handles; every bit pattern the type allows stays
        // valid in any process.
        unsafe impl Persistent for $t {
            const FINGERPRINT: u64 = fingerprint(stringify!($t).as_bytes());
        }
    )*};
}

plain!(
    (),
    bool,
    char,
    u8,
    u16,
    u32,
    u64,
    u128,
    usize,
    i8,
    i16,
    i32,
    i64,
    i128,
    isize,
    f32,
    f64,
    NonZeroU8,
    NonZeroU16,
    NonZeroU32,
    NonZeroU64,
    NonZeroUsize,
    NonZeroI8,
    NonZeroI16,
    NonZeroI32,
    NonZeroI64
);

// SAFETY: an array of persistent values is persistent.
unsafe impl<T: Persistent, const N: usize> Persistent for [T; N] {
    const FINGERPRINT: u64 = fingerprint_combine(fingerprint_combine(fingerprint(b"[T; N]"), T::FINGERPRINT), N as u64);
}

// SAFETY: None holds nothing; Some holds a persistent value.
unsafe impl<T: Persistent> Persistent for Option<T> {
    const FINGERPRINT: u64 = fingerprint_combine(fingerprint(b"Option"), T::FINGERPRINT);
}

// SAFETY: a transparent wrapper of a persistent value.
unsafe impl<T: Persistent> Persistent for Wrapping<T> {
    const FINGERPRINT: u64 = fingerprint_combine(fingerprint(b"Wrapping"), T::FINGERPRINT);
}

// SAFETY: holds no data at all.
unsafe impl<T: ?Sized> Persistent for PhantomData<T> {
    const FINGERPRINT: u64 = fingerprint(b"PhantomData");
}

macro_rules! tuple {
    ($($name:ident)+) => {
        // SAFETY: a tuple of persistent values is persistent.
        unsafe impl<$($name: Persistent),+> Persistent for ($($name,)+) {
            const FINGERPRINT: u64 = {
                let mut h = fingerprint(b"tuple");
                $(h = fingerprint_combine(h, $name::FINGERPRINT);)+
                h
            };
        }
    };
}
tuple!(A);
tuple!(A B);
tuple!(A B C);
tuple!(A B C D);
tuple!(A B C D E);
tuple!(A B C D E F);
tuple!(A B C D E F G);
tuple!(A B C D E F G H);
tuple!(A B C D E F G H I);
tuple!(A B C D E F G H I J);
tuple!(A B C D E F G H I J K);
tuple!(A B C D E F G H I J K L);

/// Declare a struct that may live in the heap: it gets `#[repr(C)]` (a field order that no
/// compiler version can change) and a [`Persistent`](crate::alloc::Persistent) impl whose
/// fingerprint hashes the struct's name, its fields' names and types, and the fields' own
/// fingerprints. A field whose type is not `Persistent` is a compile error.
///
/// One lifetime parameter is allowed (for structs holding heap collections, which borrow the
/// heap); type parameters are not.
///
/// ```
/// use fams::alloc::{PVec, PHashMap};
/// fams::persistent! {
///     /// The application's root object.
///     pub struct Root<'h> {
///         pub counter: u64,
///         pub names: PVec<'h, u8>,
///         pub index: PHashMap<'h, u64, [u8; 16]>,
///     }
/// }
/// ```
///
/// ```compile_fail
/// fams::persistent! {
///     pub struct Bad { pub name: String } // String's buffer is in the process, not the heap
/// }
/// ```
#[macro_export]
macro_rules! persistent {
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident $(<$lt:lifetime>)? {
            $($(#[$fattr:meta])* $fvis:vis $field:ident : $fty:ty),* $(,)?
        }
    ) => {
        $(#[$attr])*
        #[repr(C)]
        $vis struct $name $(<$lt>)? {
            $($(#[$fattr])* $fvis $field : $fty),*
        }

        // SAFETY: every field's type is `Persistent` (the fingerprint below names each field's
        // `Persistent::FINGERPRINT`, which does not compile otherwise), so is the struct.
        unsafe impl $(<$lt>)? $crate::alloc::Persistent for $name $(<$lt>)? {
            const FINGERPRINT: u64 = {
                #[allow(unused_mut)]
                let mut h = $crate::alloc::fingerprint(
                    concat!("struct ", stringify!($name), $(" ", stringify!($field), ": ", stringify!($fty), ","),*).as_bytes(),
                );
                $(h = $crate::alloc::fingerprint_combine(h, <$fty as $crate::alloc::Persistent>::FINGERPRINT);)*
                h
            };
        }
    };
}
