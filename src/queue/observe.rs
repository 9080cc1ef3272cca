//! Reads for monitoring: the queue by destination domain (`GET /metrics`)
//! and the samples of the last day (the status page).

use super::{message_summary, recipient_status, LinkState, MessageSummary, Store, StoreError};

/// How long samples are kept (the status page draws the last 24 hours).
pub const SAMPLES_KEPT: i64 = 48 * 3600;

/// The queue and the link at one moment ([`super::Change::Sample`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub at: i64,
    pub queued: i64,
    pub deferred: i64,
    pub held: i64,
    pub link: LinkState,
}

impl Store {
    /// Pending recipients (queued, deferred, held) per destination domain,
    /// largest first: the `top` largest by name, then the rest summed as
    /// `other` (only when there is a rest).
    pub fn pending_by_domain(&self, top: usize) -> Result<Vec<(String, i64)>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT domain, count(*) AS n FROM recipients
                  WHERE state IN ('queued', 'deferred', 'held')
                  GROUP BY domain ORDER BY n DESC, domain",
            )?;
            let mut out: Vec<(String, i64)> = Vec::new();
            let mut other = 0;
            let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (domain, n) = row?;
                if out.len() < top && domain != "other" {
                    out.push((domain, n));
                } else {
                    other += n;
                }
            }
            if other > 0 {
                out.push(("other".into(), other));
            }
            Ok(out)
        })
    }

    /// The `limit` oldest messages still pending (as [`Store::list`] gives
    /// them), and how many are pending in all.
    pub fn oldest_pending(&self, limit: usize) -> Result<(Vec<MessageSummary>, i64), StoreError> {
        self.with(|c| {
            let total: i64 = c.query_row(
                "SELECT count(DISTINCT message_id) FROM recipients
                  WHERE state IN ('queued', 'deferred', 'held')",
                [],
                |r| r.get(0),
            )?;
            let mut msgs = c.prepare_cached(
                "SELECT m.id, m.received_at, m.size, m.sender, m.protocol
                   FROM messages m
                  WHERE EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id
                                   AND r.state IN ('queued', 'deferred', 'held'))
                  ORDER BY m.received_at, m.id LIMIT ?1",
            )?;
            let mut out = msgs
                .query_map([limit as i64], message_summary)?
                .collect::<Result<Vec<_>, _>>()?;
            let mut rcpts = c.prepare_cached(
                "SELECT address, state, attempts, next_attempt, last_reply, route
                   FROM recipients WHERE message_id = ?1 ORDER BY idx",
            )?;
            for m in &mut out {
                m.recipients = rcpts
                    .query_map([&m.id], |r| recipient_status(r, 0))?
                    .collect::<Result<_, _>>()?;
            }
            Ok((out, total))
        })
    }

    /// Samples taken at or after `since`, oldest first.
    pub fn samples(&self, since: i64) -> Result<Vec<Sample>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT at, queued, deferred, held, link FROM samples
                  WHERE at >= ?1 ORDER BY at",
            )?;
            let rows = st.query_map([since], |r| {
                Ok(Sample {
                    at: r.get(0)?,
                    queued: r.get(1)?,
                    deferred: r.get(2)?,
                    held: r.get(3)?,
                    link: r.get::<_, String>(4)?.parse().unwrap_or(LinkState::Unknown),
                })
            })?;
            rows.collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    fn store() -> (tempfile::TempDir, Store, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let s = Store::open(&path).unwrap();
        (dir, s, path)
    }

    #[tokio::test]
    async fn samples_are_taken_by_the_writer_and_purged() {
        let (_dir, store, path) = store();
        let (writer, thread) = Writer::start(&path).unwrap();
        writer
            .apply(vec![Change::Sample { at: 100 }])
            .await
            .unwrap();
        writer
            .apply(vec![Change::Sample { at: 160 }])
            .await
            .unwrap();
        let s = store.samples(0).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0],
            Sample {
                at: 100,
                queued: 0,
                deferred: 0,
                held: 0,
                link: LinkState::Unknown
            }
        );
        assert_eq!(store.samples(150).unwrap().len(), 1);
        writer
            .apply(vec![Change::PurgeSamples { before: 150 }])
            .await
            .unwrap();
        assert_eq!(store.samples(0).unwrap().len(), 1);
        drop(writer);
        thread.join();
    }

    fn msg(received_at: i64, domains: &[&str]) -> NewMessage {
        NewMessage {
            id: QueueId::generate(),
            received_at,
            sender: "s@x.example".into(),
            client_addr: "127.0.0.1".into(),
            client_helo: "h".into(),
            auth_user: None,
            protocol: "ESMTP".into(),
            body_type: None,
            smtputf8: false,
            dsn_ret: None,
            dsn_envid: None,
            recipients: domains
                .iter()
                .enumerate()
                .map(|(i, d)| NewRecipient {
                    address: format!("u{i}@{d}"),
                    domain: d.to_string(),
                    route: Route::Upstream,
                    dsn_notify: None,
                    dsn_orcpt: None,
                    mailboxes: Vec::new(),
                })
                .collect(),
            body: b"Subject: x\r\n\r\nx\r\n".to_vec().into(),
        }
    }

    #[tokio::test]
    async fn domains_are_cut_to_the_largest_and_the_oldest_come_first() {
        let (_dir, store, path) = store();
        let (writer, thread) = Writer::start(&path).unwrap();
        let newest = msg(300, &["b.example", "c.example"]);
        let oldest = msg(100, &["a.example", "a.example", "b.example"]);
        let middle = msg(200, &["a.example", "d.example"]);
        for m in [newest, oldest.clone(), middle] {
            writer.insert(m).await.unwrap();
        }
        assert_eq!(
            store.pending_by_domain(2).unwrap(),
            vec![
                ("a.example".to_string(), 3),
                ("b.example".to_string(), 2),
                ("other".to_string(), 2)
            ]
        );
        assert_eq!(store.pending_by_domain(10).unwrap().len(), 4);
        let (first, total) = store.oldest_pending(1).unwrap();
        assert_eq!(total, 3);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].id, oldest.id.to_string());
        assert_eq!(first[0].recipients.len(), 3);
        drop(writer);
        thread.join();
    }
}
