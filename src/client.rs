//! HTTP clients of the bootsync server's `/v1` API (filled in by the foundation work).
