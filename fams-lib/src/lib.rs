//! fams
