//! The in-process trainer (work in progress).
