//! Shared helpers for the integration and crash tests.
