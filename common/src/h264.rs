//! H.264 Annex B parsing (being written).
