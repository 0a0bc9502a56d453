//! The rings against a peer that rewrites indices and records between our
//! reads. Whatever the peer does: no panic; an index more than a ring away
//! from ours quarantines the ring, for good, and nothing else does; and
//! while the peer keeps to the protocol for the indices, every record
//! arrives exactly as the peer left it in its slot when it was taken, in
//! order, and a full ring is reported only when it is full.
#![no_main]

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use arbitrary::Arbitrary;
use hyp_core::ring::abi::Record;
use hyp_core::ring::{Consumer, OwnedRing, Producer, RingError, OWNED_RING_ENTRIES};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    /// The peer publishes a record on the ring we consume, by the protocol.
    PeerPush([u64; 8]),
    /// The peer rewrites the producer index of the ring we consume.
    PeerProducerIndex(u32),
    /// The peer rewrites one word of a slot of the ring we consume.
    PeerSlot(u8, u8, u64),
    /// We pop.
    Pop,
    /// We publish a record on the ring the peer consumes.
    Push([u64; 8]),
    /// The peer consumes one record, by the protocol.
    PeerPop,
    /// The peer rewrites the consumer index of the ring we produce.
    PeerConsumerIndex(u32),
}

fuzz_target!(|ops: Vec<Op>| {
    let (inbound, outbound) = (OwnedRing::new(), OwnedRing::new());
    let mut ours_in = Consumer::attach(inbound.view()).unwrap();
    let mut peer_out = Producer::attach(inbound.view()).unwrap();
    let mut ours_out = Producer::attach(outbound.view()).unwrap();
    let mut peer_in = Consumer::attach(outbound.view()).unwrap();
    let cap = OWNED_RING_ENTRIES;
    // What we should pop next, by ring index, while the peer keeps to the
    // protocol for the indices (a rewritten slot is just different data).
    let mut expected: Option<VecDeque<(u32, Record)>> = Some(VecDeque::new());
    let (mut next_in, mut in_quarantined) = (0u32, false);
    // Records we popped and pushed, and the consumer index the peer last
    // published on the ring we produce (its own count, or its rewrite).
    let (mut popped, mut pushed, mut peer_consumed, mut peer_published) = (0u32, 0u32, 0u32, 0u32);
    // What the peer should read back of ours, while it keeps the indices.
    let mut sent: Option<VecDeque<Record>> = Some(VecDeque::new());
    let mut out_quarantined = false;
    for op in ops {
        match op {
            Op::PeerPush(words) => {
                // The peer's own producer may be confused by its own
                // rewrites; it must not panic either.
                if peer_out.push(&Record(words)).is_ok() {
                    if let Some(q) = expected.as_mut() {
                        q.push_back((next_in, Record(words)));
                        next_in = next_in.wrapping_add(1);
                    }
                }
            }
            Op::PeerProducerIndex(v) => {
                inbound.scribble_producer(v);
                expected = None;
            }
            Op::PeerSlot(slot, word, value) => {
                inbound.scribble_slot(slot as usize, word as usize, value);
                if let Some(q) = expected.as_mut() {
                    for (index, rec) in q.iter_mut() {
                        if *index as usize % cap == slot as usize % cap {
                            rec.0[word as usize % 8] = value;
                        }
                    }
                }
            }
            Op::Pop => {
                let ready = inbound.view().producer_word().load(Ordering::Acquire).wrapping_sub(popped);
                let got = ours_in.pop();
                if in_quarantined || ready > cap as u32 {
                    assert!(matches!(got, Err(RingError::Quarantined(_))), "index {ready} ahead taken: {got:?}");
                    in_quarantined = true;
                    continue;
                }
                let got = got.expect("a ring within bounds is served");
                assert_eq!(got.is_some(), ready > 0, "{ready} ready, popped {got:?}");
                popped = popped.wrapping_add(u32::from(got.is_some()));
                if let Some(q) = expected.as_mut() {
                    assert_eq!(got, q.pop_front().map(|(_, r)| r), "a record did not arrive intact");
                }
            }
            Op::Push(words) => {
                let used = pushed.wrapping_sub(peer_published);
                let got = ours_out.push(&Record(words));
                if out_quarantined || used > cap as u32 {
                    assert!(matches!(got, Err(RingError::Quarantined(_))), "{used} in use, pushed: {got:?}");
                    out_quarantined = true;
                    continue;
                }
                if used == cap as u32 {
                    assert_eq!(got, Err(RingError::Full), "full ring");
                    continue;
                }
                assert_eq!(got, Ok(()), "{used} of {cap} in use");
                pushed = pushed.wrapping_add(1);
                if let Some(q) = sent.as_mut() {
                    q.push_back(Record(words));
                }
            }
            Op::PeerPop => {
                let got = peer_in.pop();
                if let Ok(Some(_)) = got {
                    peer_consumed = peer_consumed.wrapping_add(1);
                    peer_published = peer_consumed;
                }
                if let (Some(q), Ok(got)) = (sent.as_mut(), got) {
                    assert_eq!(got, q.pop_front(), "the peer read back something else");
                }
            }
            Op::PeerConsumerIndex(v) => {
                outbound.scribble_consumer(v);
                peer_published = v;
                sent = None;
            }
        }
    }
});
