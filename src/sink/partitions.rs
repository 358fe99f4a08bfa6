//! The partition manager: `readings` partitions created ahead of time, on
//! demand for late or early data, and dropped past retention.
//!
//! Partitions are named `readings_pYYYYMMDD` (daily) or `readings_pYYYYMMDDHH`
//! (hourly) and cover `[start, start + interval)` in UTC. Which partitions
//! exist is cached per process, so the hot path asks the database only for
//! a partition it has not seen. DDL runs on the parent table, inside a
//! transaction holding the schema advisory lock, so concurrent writers (or
//! gateways) never race on `CREATE TABLE`.

use std::collections::HashSet;
use std::sync::Mutex;

use tokio_postgres::Client;

use super::schema::DDL_LOCK;
use super::settings::PartitionInterval;
use crate::model::{civil_from_days, days_from_civil, Micros, MICROS_PER_DAY};

/// Creates and drops partitions of `<schema>.readings`.
#[derive(Debug)]
pub struct Partitions {
    schema: String,
    interval: PartitionInterval,
    known: Mutex<HashSet<i64>>,
}

impl Partitions {
    pub fn new(schema: &str, interval: PartitionInterval) -> Partitions {
        Partitions {
            schema: schema.to_string(),
            interval,
            known: Mutex::new(HashSet::new()),
        }
    }

    /// The partition index (start / interval) holding time `t`.
    #[inline]
    pub fn index_of(&self, t: Micros) -> i64 {
        self.interval.index_of(t)
    }

    /// The partition length.
    pub fn interval(&self) -> PartitionInterval {
        self.interval
    }

    /// Table name (without schema) of partition `index`.
    pub fn name(&self, index: i64) -> String {
        let start = index * self.interval.micros();
        let (y, m, d) = civil_from_days(start.div_euclid(MICROS_PER_DAY));
        match self.interval {
            PartitionInterval::Daily => format!("readings_p{y:04}{m:02}{d:02}"),
            PartitionInterval::Hourly => {
                let h = start.rem_euclid(MICROS_PER_DAY) / 3_600_000_000;
                format!("readings_p{y:04}{m:02}{d:02}{h:02}")
            }
        }
    }

    /// The partition index of a table this manager named, `None` for any
    /// other name.
    pub fn parse_name(&self, name: &str) -> Option<i64> {
        let digits = name.strip_prefix("readings_p")?;
        let want = match self.interval {
            PartitionInterval::Daily => 8,
            PartitionInterval::Hourly => 10,
        };
        if digits.len() != want || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let num = |r: std::ops::Range<usize>| digits[r].parse::<u32>().ok();
        let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
        if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
            return None;
        }
        let h = if want == 10 { num(8..10)? } else { 0 };
        let start =
            days_from_civil(i64::from(y), m, d) * MICROS_PER_DAY + i64::from(h) * 3_600_000_000;
        let index = self.index_of(start);
        (self.name(index) == name).then_some(index)
    }

    fn bound(&self, index: i64) -> String {
        let t = index * self.interval.micros();
        let (y, m, d) = civil_from_days(t.div_euclid(MICROS_PER_DAY));
        let h = t.rem_euclid(MICROS_PER_DAY) / 3_600_000_000;
        format!("{y:04}-{m:02}-{d:02} {h:02}:00:00+00")
    }

    /// Makes sure every partition in `indexes` exists.
    ///
    /// # Errors
    /// Any database error; nothing is cached for a partition whose creation failed.
    pub async fn ensure(
        &self,
        client: &mut Client,
        indexes: &[i64],
    ) -> Result<usize, tokio_postgres::Error> {
        let missing: Vec<i64> = {
            let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            indexes
                .iter()
                .copied()
                .filter(|i| !known.contains(i))
                .collect()
        };
        if missing.is_empty() {
            return Ok(0);
        }
        let mut sql = String::new();
        for &index in &missing {
            sql.push_str(&format!(
                "CREATE TABLE IF NOT EXISTS {s}.{name} PARTITION OF {s}.readings FOR VALUES FROM ('{from}') TO ('{to}');\n",
                s = self.schema,
                name = self.name(index),
                from = self.bound(index),
                to = self.bound(index + 1),
            ));
        }
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&DDL_LOCK])
            .await?;
        tx.batch_execute(&sql).await?;
        tx.commit().await?;
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.extend(missing.iter().copied());
        tracing::debug!(count = missing.len(), "partitions ensured");
        Ok(missing.len())
    }

    /// Drops `indexes` from the cache so the next batch re-creates them.
    pub fn forget(&self, indexes: &[i64]) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        for i in indexes {
            known.remove(i);
        }
    }

    /// Creates the partitions from the previous one to `ahead` past the one
    /// holding `now`.
    ///
    /// # Errors
    /// Any database error.
    pub async fn create_ahead(
        &self,
        client: &mut Client,
        now: Micros,
        ahead: u32,
    ) -> Result<usize, tokio_postgres::Error> {
        let current = self.index_of(now);
        let wanted: Vec<i64> = (current - 1..=current + i64::from(ahead)).collect();
        self.ensure(client, &wanted).await
    }

    /// Drops partitions that end before `cutoff`. Returns the dropped names.
    ///
    /// # Errors
    /// Any database error.
    pub async fn drop_before(
        &self,
        client: &mut Client,
        cutoff: Micros,
    ) -> Result<Vec<String>, tokio_postgres::Error> {
        let rows = client
            .query(
                "SELECT c.relname FROM pg_inherits i \
                 JOIN pg_class c ON c.oid = i.inhrelid \
                 JOIN pg_class p ON p.oid = i.inhparent \
                 JOIN pg_namespace n ON n.oid = p.relnamespace \
                 WHERE n.nspname = $1 AND p.relname = 'readings'",
                &[&self.schema],
            )
            .await?;
        let cutoff_index = self.index_of(cutoff);
        let mut dropped = Vec::new();
        for row in rows {
            let name: String = row.get(0);
            // Only partitions this manager names are touched.
            let Some(index) = self.parse_name(&name) else {
                continue;
            };
            if index < cutoff_index {
                let tx = client.transaction().await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&DDL_LOCK])
                    .await?;
                tx.batch_execute(&format!("DROP TABLE IF EXISTS {}.{name}", self.schema))
                    .await?;
                tx.commit().await?;
                self.known
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&index);
                dropped.push(name);
            }
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_bounds() {
        let daily = Partitions::new("edge", PartitionInterval::Daily);
        let t = 1_732_492_800_000_000; // 2024-11-25T00:00:00Z
        let i = daily.index_of(t);
        assert_eq!(daily.name(i), "readings_p20241125");
        assert_eq!(daily.name(daily.index_of(t - 1)), "readings_p20241124");
        assert_eq!(daily.bound(i), "2024-11-25 00:00:00+00");
        let hourly = Partitions::new("edge", PartitionInterval::Hourly);
        let h = hourly.index_of(t + 5 * 3_600_000_000 + 1);
        assert_eq!(hourly.name(h), "readings_p2024112505");
        assert_eq!(hourly.bound(h + 1), "2024-11-25 06:00:00+00");
        assert_eq!(daily.parse_name("readings_p20241125"), Some(i));
        assert_eq!(hourly.parse_name("readings_p2024112505"), Some(h));
        assert_eq!(daily.parse_name("readings_p20241332"), None);
        assert_eq!(daily.parse_name("readings_archive"), None);
    }
}
