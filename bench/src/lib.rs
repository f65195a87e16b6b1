//! Benchmarks live in benches/ (a later issue).
