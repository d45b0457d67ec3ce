//! dsv porcelain.
