//! The Lua scripts that decide, inside Redis and atomically, who holds a camera ID and
//! whose presence record stands; and what their answers mean for this node (pure).
//!
//! Keys of the scripts: the camera's presence hash, its owner key and its last-seen
//! record (one hash slot).

use peercam_common::rdv::close;

/// Claims the ID (fails if another key holds it) and writes the presence record.
/// KEYS: presence, owner, seen. ARGV: owner tag, record, presence TTL ms, key hex,
/// owner TTL ms, seen TTL ms.
pub(super) const CLAIM: &str = r"
local o = redis.call('GET', KEYS[2])
if o and o ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'rec', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[6])
return 1
";

/// Like CLAIM, but only while this connection still holds the record (or nobody does):
/// 1 refreshed, 0 another connection holds it, -1 another key holds the ID.
pub(super) const REFRESH: &str = r"
local o = redis.call('GET', KEYS[2])
if o and o ~= ARGV[4] then return -1 end
local cur = redis.call('HGET', KEYS[1], 'owner')
if cur and cur ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'rec', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[6])
return 1
";

/// Deletes the record if this connection holds it; keeps the ID pinned for the pin time
/// (the last-seen record stays for its own TTL).
/// KEYS: presence, owner. ARGV: owner tag, key hex, pin ms.
pub(super) const RELEASE: &str = r"
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
return 1
";

/// The scripts, hashed once (they run as EVALSHA, loaded on first use).
pub(super) struct Scripts {
    pub(super) claim: redis::Script,
    pub(super) refresh: redis::Script,
    pub(super) release: redis::Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Scripts {
            claim: redis::Script::new(CLAIM),
            refresh: redis::Script::new(REFRESH),
            release: redis::Script::new(RELEASE),
        }
    }
}

/// What a REFRESH answer means for the local camera: `None` keep it, or close it with
/// this code (`ID_TAKEN`: another key holds the ID, e.g. claimed while this node could
/// not reach Redis; `REPLACED`: the same camera registered again on another connection).
pub(super) fn refresh_verdict(answer: i64) -> Option<u32> {
    match answer {
        -1 => Some(close::ID_TAKEN),
        0 => Some(close::REPLACED),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_answers() {
        assert_eq!(refresh_verdict(1), None);
        assert_eq!(refresh_verdict(0), Some(close::REPLACED));
        assert_eq!(refresh_verdict(-1), Some(close::ID_TAKEN));
    }

    #[test]
    fn scripts_use_only_their_declared_keys() {
        // Redis Cluster requires every key a script touches to be passed in KEYS.
        for script in [CLAIM, REFRESH, RELEASE] {
            for line in script.lines().filter(|l| l.contains("redis.call")) {
                assert!(line.contains("KEYS["), "{line}");
                assert!(!line.contains("KEYS[4]"), "{line}");
            }
        }
    }
}
