//! The kiosk's line protocol: `Request::parse` on any bytes, and `LineSplitter` on any stream.
//!
//! Properties, beyond "no panic":
//! - a request that parses re-encodes (`Request::encode`) to a line that parses to the same
//!   request (the round trip the property test in `protocol.rs` samples);
//! - the splitter hands out one input per line end, whatever the chunking of the stream, no line
//!   holding a line end or longer than `MAX_LINE + 1` bytes (one more than `parse` takes, so
//!   such a line is answered `ERR 413` like a dropped one), and is pending exactly while bytes
//!   follow the last line end.
//!
//! Shared by the fuzz target (`fuzz/fuzz_targets/protocol.rs`) and the test that replays every
//! committed seed (`tests/integration/fuzz_seeds.rs`).

use graft::kiosk::protocol::{Input, LineSplitter, Request, MAX_LINE};

fn round_trip(line: &[u8]) {
    if let Ok(req) = Request::parse(line) {
        let again = req.encode();
        assert_eq!(
            Request::parse(again.as_bytes()).as_ref(),
            Ok(&req),
            "{:?} re-encoded as {again:?}",
            String::from_utf8_lossy(line)
        );
    }
}

/// One input, as the fuzz target gets it: panics on a finding.
pub fn one(data: &[u8]) {
    round_trip(data);

    // The same bytes as a stream: whole, then in chunks whose sizes come from the data.
    let mut whole = LineSplitter::default();
    let all = whole.push(data);
    let mut chunked = LineSplitter::default();
    let mut pieces = Vec::new();
    let mut rest = data;
    let mut i = 0usize;
    while !rest.is_empty() {
        let k = (1 + data[i % data.len()] as usize % 61).min(rest.len());
        pieces.extend(chunked.push(&rest[..k]));
        rest = &rest[k..];
        i += 1;
    }
    assert_eq!(all, pieces, "chunking changed the lines");
    let ends = data.iter().filter(|b| **b == b'\n').count();
    assert_eq!(all.len(), ends, "one input per line end");
    let tail = data.rsplit(|b| *b == b'\n').next().unwrap_or_default();
    assert_eq!(whole.pending(), !tail.is_empty(), "pending after {tail:?}");
    for input in &all {
        if let Input::Line(line) = input {
            assert!(!line.contains(&b'\n') && line.len() <= MAX_LINE + 1);
            round_trip(line);
        }
    }
    assert_eq!(whole.expire(), !tail.is_empty());
    assert!(!whole.pending());
}
