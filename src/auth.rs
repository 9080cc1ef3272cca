//! Accounts' passwords (argon2) and the SASL mechanisms PLAIN (RFC 4616) and
//! LOGIN, shared by SMTP AUTH and POP3.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, PasswordHasher, Version};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// A PHC string for `password`, with a fresh salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

thread_local! {
    /// Argon2's working memory, kept by each thread that checks passwords
    /// and reused: allocated and freed for every check, the allocator kept
    /// the freed blocks in pieces and memory grew with the number of
    /// checks. The pool's threads free it when they have been idle a while.
    static MEMORY: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// The most memory a stored hash may ask for (256 MiB): a hash with absurd
/// parameters is refused, not computed.
const MAX_BLOCKS: usize = 256 * 1024;

/// Checks `password` against a stored PHC string. `None` (no such account)
/// still costs one hash, so the time taken does not say whether a name exists.
pub fn verify_password(stored: Option<&str>, password: &str) -> bool {
    const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Q4Ml7sWbkjiwhXHhyp2BsO0mmAxMPf85g4qlnjJe0Tg";
    let hash = stored.unwrap_or(DUMMY);
    let ok = MEMORY.with(|m| matches(&mut m.borrow_mut(), hash, password.as_bytes()));
    ok && stored.is_some()
}

/// Argon2 of `password` with the parameters and salt of `stored`, in
/// `memory`, compared in constant time with the stored output.
fn matches(memory: &mut Vec<Block>, stored: &str, password: &[u8]) -> bool {
    let mut check = || -> Option<bool> {
        let h = PasswordHash::new(stored).ok()?;
        let (salt, expected) = (h.salt.as_ref()?, h.hash.as_ref()?);
        let algorithm = Algorithm::try_from(h.algorithm.as_str()).ok()?;
        let version = match h.version {
            Some(v) => Version::try_from(v).ok()?,
            None => Version::default(),
        };
        let params = Params::try_from(&h).ok()?;
        let blocks = params.block_count();
        if blocks > MAX_BLOCKS {
            return None;
        }
        if memory.len() < blocks {
            memory.resize(blocks, Block::default());
        }
        let mut out = vec![0u8; expected.len()];
        Argon2::new(algorithm, version, params)
            .hash_password_into_with_memory(password, salt, &mut out, &mut memory[..blocks])
            .ok()?;
        let diff = out
            .iter()
            .zip(expected.as_bytes())
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        Some(diff == 0)
    };
    check().unwrap_or(false)
}

/// Password checks on a few threads of their own, so that many logins at
/// once cost at most `threads` argon2 verifications of memory (about
/// 19 MiB each) and CPU; the others wait their turn. Threads of their own,
/// not the runtime's blocking pool, each keeping its argon2 memory for the
/// next check (see [`MEMORY`]).
pub struct VerifyPool {
    threads: usize,
    queue: std::sync::Mutex<Option<Arc<Queue>>>,
}

type Job = Box<dyn FnOnce() + Send>;

/// Jobs waiting for a thread.
#[derive(Default)]
struct Queue {
    jobs: std::sync::Mutex<VecDeque<Job>>,
    ready: std::sync::Condvar,
}

/// A pool thread idle this long frees argon2's memory.
const IDLE: Duration = Duration::from_secs(30);

impl VerifyPool {
    pub fn new(threads: usize) -> VerifyPool {
        VerifyPool {
            threads: threads.max(1),
            queue: std::sync::Mutex::new(None),
        }
    }

    /// Runs `f` (a password check) on the pool; None if it could not run.
    /// A job whose caller has gone (a session that ended) is skipped.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if !tx.is_closed() {
                let _ = tx.send(f());
            }
        });
        let queue = self.queue()?;
        queue
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(job);
        queue.ready.notify_one();
        rx.await.ok()
    }

    /// The queue to the threads, started on first use.
    fn queue(&self) -> Option<Arc<Queue>> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.is_none() {
            let q = Arc::new(Queue::default());
            for i in 0..self.threads {
                let q = q.clone();
                std::thread::Builder::new()
                    .name(format!("outpost-verify-{i}"))
                    .spawn(move || work(&q))
                    .ok()?;
            }
            *queue = Some(q);
        }
        queue.clone()
    }
}

/// A pool thread: runs jobs; when idle for [`IDLE`], frees its memory.
fn work(q: &Queue) {
    let mut jobs = q.jobs.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if let Some(job) = jobs.pop_front() {
            drop(jobs);
            job();
            jobs = q.jobs.lock().unwrap_or_else(|p| p.into_inner());
            continue;
        }
        let (guard, waited) = q
            .ready
            .wait_timeout(jobs, IDLE)
            .unwrap_or_else(|p| p.into_inner());
        jobs = guard;
        if waited.timed_out() && jobs.is_empty() {
            MEMORY.with(|m| *m.borrow_mut() = Vec::new());
        }
    }
}

/// Decodes a SASL response; `=` is the empty response (RFC 4954 §4).
pub fn decode_b64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if s == "=" {
        return Some(Vec::new());
    }
    B64.decode(s).ok()
}

pub fn encode_b64(b: &[u8]) -> String {
    B64.encode(b)
}

/// PLAIN: `authzid NUL authcid NUL passwd`. Returns (user, password); an
/// authzid other than the user is refused (no proxy logins).
pub fn parse_plain(decoded: &[u8]) -> Option<(String, String)> {
    let mut parts = decoded.split(|&b| b == 0);
    let authz = parts.next()?;
    let user = std::str::from_utf8(parts.next()?).ok()?;
    let pass = std::str::from_utf8(parts.next()?).ok()?;
    if parts.next().is_some() || user.is_empty() {
        return None;
    }
    if !authz.is_empty() && authz != user.as_bytes() {
        return None;
    }
    Some((user.to_string(), pass.to_string()))
}

/// Account names: what a POP3 client and a mail address can both carry.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
        && !name.starts_with(['.', '-'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2"));
        assert!(verify_password(Some(&h), "s3cret"));
        assert!(!verify_password(Some(&h), "s3cret "));
        assert!(!verify_password(None, "s3cret"));
        assert!(!verify_password(Some("garbage"), "x"));
    }

    #[test]
    fn plain() {
        assert_eq!(
            parse_plain(b"\0alice\0pw"),
            Some(("alice".into(), "pw".into()))
        );
        assert_eq!(
            parse_plain(b"alice\0alice\0pw"),
            Some(("alice".into(), "pw".into()))
        );
        assert_eq!(parse_plain(b"bob\0alice\0pw"), None);
        assert_eq!(parse_plain(b"\0alice"), None);
        assert_eq!(decode_b64("="), Some(vec![]));
        assert_eq!(decode_b64("!!"), None);
    }

    #[test]
    fn names() {
        assert!(valid_user_name("alice.smith"));
        assert!(!valid_user_name("alice smith"));
        assert!(!valid_user_name("a@b"));
        assert!(!valid_user_name(""));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn password_checks_run_on_a_bounded_pool() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};
        let pool = Arc::new(VerifyPool::new(2));
        let active = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let mut jobs = Vec::new();
        for _ in 0..12 {
            let (pool, active, most, threads) =
                (pool.clone(), active.clone(), most.clone(), threads.clone());
            jobs.push(tokio::spawn(async move {
                pool.run(move || {
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    threads.lock().unwrap().insert(std::thread::current().id());
                    // A real check: argon2 with the default parameters.
                    let ok = verify_password(None, "guess");
                    active.fetch_sub(1, Ordering::SeqCst);
                    ok
                })
                .await
            }));
        }
        for j in jobs {
            assert_eq!(j.await.unwrap(), Some(false));
        }
        assert!(most.load(Ordering::SeqCst) <= 2, "{most:?}");
        assert!(threads.lock().unwrap().len() <= 2);
    }

    #[test]
    fn absurd_parameters_are_refused_not_computed() {
        // 1 GiB of working memory asked for.
        let greedy = "$argon2id$v=19$m=1048576,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$Q4Ml7sWbkjiwhXHhyp2BsO0mmAxMPf85g4qlnjJe0Tg";
        assert!(!verify_password(Some(greedy), "x"));
        MEMORY.with(|m| assert!(m.borrow().len() <= MAX_BLOCKS));
    }
}
