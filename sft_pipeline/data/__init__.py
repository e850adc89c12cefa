"""Task-agnostic data handling: file readers, text normalisation, cleaning with row accounting, label votes, the split."""
