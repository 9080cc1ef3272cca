//! Time windows: when the link may be used (`flush.windows`) and when large
//! messages may go (`flush.large_message_window`), in local time.
//!
//! A window is `[DAYS ]HH:MM-HH:MM`: `"Mon-Fri 07:00-19:00"`,
//! `"Sat,Sun 09:00-12:00"`, `"22:00-06:00"` (every day, across midnight:
//! the part after midnight belongs to the day the window started), or
//! days alone (`"Sat,Sun"`: all day). A list of windows is open when any of
//! them is; an empty list is always open. Pure: callers give the local time.

use chrono::{Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime, Timelike};

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// One window: on these days (Monday first), from `start` to `end` minutes
/// after midnight (`end` may be 1440, or at most `start` for a window
/// across midnight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    days: [bool; 7],
    start: u32,
    end: u32,
    text: String,
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Window {
    type Err = String;

    fn from_str(text: &str) -> Result<Window, String> {
        let bad = |why: &str| {
            format!("{text:?}: {why} (write e.g. \"Mon-Fri 07:00-19:00\", \"22:00-06:00\" or \"Sat,Sun\")")
        };
        let mut words = text.split_whitespace();
        let (days_part, time_part) = match (words.next(), words.next(), words.next()) {
            (Some(a), None, None) if a.contains(':') => (None, Some(a)),
            (Some(a), None, None) => (Some(a), None),
            (Some(a), Some(b), None) => (Some(a), Some(b)),
            _ => return Err(bad("expected days and/or a time range")),
        };
        let mut days = [days_part.is_none(); 7];
        if let Some(spec) = days_part {
            for part in spec.split(',') {
                let day = |d: &str| {
                    DAYS.iter()
                        .position(|x| d.get(..3).is_some_and(|p| x.eq_ignore_ascii_case(p)))
                        .ok_or_else(|| bad(&format!("{d:?} is not a day")))
                };
                match part.split_once('-') {
                    Some((a, b)) => {
                        let (a, b) = (day(a)?, day(b)?);
                        let mut i = a;
                        loop {
                            days[i] = true;
                            if i == b {
                                break;
                            }
                            i = (i + 1) % 7;
                        }
                    }
                    None => days[day(part)?] = true,
                }
            }
        }
        let (start, end) = match time_part {
            None => (0, 1440),
            Some(range) => {
                let (a, b) = range
                    .split_once('-')
                    .ok_or_else(|| bad("a time range is HH:MM-HH:MM"))?;
                let minute = |t: &str| -> Result<u32, String> {
                    let (h, m) = t
                        .split_once(':')
                        .ok_or_else(|| bad(&format!("{t:?} is not HH:MM")))?;
                    let (h, m): (u32, u32) = (
                        h.parse().map_err(|_| bad(&format!("{t:?} is not HH:MM")))?,
                        m.parse().map_err(|_| bad(&format!("{t:?} is not HH:MM")))?,
                    );
                    if m > 59 || h > 24 || (h == 24 && m > 0) {
                        return Err(bad(&format!("{t:?} is not a time of day")));
                    }
                    Ok(h * 60 + m)
                };
                let (a, b) = (minute(a)?, minute(b)?);
                if a == b || a == 1440 {
                    return Err(bad("the window is empty"));
                }
                (a, b)
            }
        };
        Ok(Window {
            days,
            start,
            end,
            text: text.to_string(),
        })
    }
}

impl serde::Serialize for Window {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Window {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Window, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

fn minute_of(t: NaiveDateTime) -> u32 {
    t.hour() * 60 + t.minute()
}

impl Window {
    /// True when `t` (local time) is inside this window.
    pub fn contains(&self, t: NaiveDateTime) -> bool {
        let day = t.weekday().num_days_from_monday() as usize;
        let yesterday = (day + 6) % 7;
        let m = minute_of(t);
        if self.start < self.end {
            self.days[day] && self.start <= m && m < self.end
        } else {
            // Across midnight.
            (self.days[day] && m >= self.start) || (self.days[yesterday] && m < self.end)
        }
    }

    /// The moments (local) at which this window may open or close, on the
    /// days from `from` on, `days` days long.
    fn edges(&self, from: NaiveDate, days: i64) -> impl Iterator<Item = NaiveDateTime> + '_ {
        (0..days).flat_map(move |d| {
            let date = from + Duration::days(d);
            [self.start, self.end]
                .into_iter()
                .map(move |m| date.and_time(NaiveTime::MIN) + Duration::minutes(i64::from(m)))
        })
    }
}

/// True when `t` is inside one of `windows` (always, when there are none).
pub fn open(windows: &[Window], t: NaiveDateTime) -> bool {
    windows.is_empty() || windows.iter().any(|w| w.contains(t))
}

/// The first moment after `t` at which [`open`] changes, if it ever does.
pub fn next_change(windows: &[Window], t: NaiveDateTime) -> Option<NaiveDateTime> {
    let now = open(windows, t);
    let from = t.date() - Duration::days(1);
    let mut edges: Vec<NaiveDateTime> = windows
        .iter()
        .flat_map(|w| w.edges(from, 9))
        .filter(|e| *e > t)
        .collect();
    edges.sort();
    edges.into_iter().find(|e| open(windows, *e) != now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap()
    }

    fn w(s: &str) -> Window {
        s.parse().unwrap()
    }

    // 2026-12-07 is a Monday.

    #[test]
    fn office_hours() {
        let office = [w("Mon-Fri 07:00-19:00")];
        assert!(open(&office, at("2026-12-07 07:00")));
        assert!(open(&office, at("2026-12-11 18:59")));
        assert!(!open(&office, at("2026-12-07 19:00")));
        assert!(!open(&office, at("2026-12-07 06:59")));
        assert!(!open(&office, at("2026-12-12 10:00")), "Saturday");
        assert_eq!(
            next_change(&office, at("2026-12-07 12:00")),
            Some(at("2026-12-07 19:00"))
        );
        // Friday evening: next Monday morning.
        assert_eq!(
            next_change(&office, at("2026-12-11 20:00")),
            Some(at("2026-12-14 07:00"))
        );
    }

    #[test]
    fn across_midnight_belongs_to_the_starting_day() {
        let night = [w("Fri 22:00-06:00")];
        assert!(open(&night, at("2026-12-11 23:00")), "Friday night");
        assert!(open(&night, at("2026-12-12 05:59")), "Saturday early");
        assert!(!open(&night, at("2026-12-12 06:00")));
        assert!(
            !open(&night, at("2026-12-07 05:00")),
            "Monday early: Sunday had none"
        );
        let every = [w("22:00-06:00")];
        assert!(open(&every, at("2026-12-07 01:00")));
        assert_eq!(
            next_change(&every, at("2026-12-07 01:00")),
            Some(at("2026-12-07 06:00"))
        );
        assert_eq!(
            next_change(&every, at("2026-12-07 12:00")),
            Some(at("2026-12-07 22:00"))
        );
    }

    #[test]
    fn days_lists_ranges_and_whole_days() {
        let weekend = [w("Sat,Sun")];
        assert!(open(&weekend, at("2026-12-12 00:00")));
        assert!(open(&weekend, at("2026-12-13 23:59")));
        assert!(!open(&weekend, at("2026-12-14 00:00")));
        let wrap = [w("Fri-Mon 10:00-24:00")];
        assert!(open(&wrap, at("2026-12-07 23:59")), "Monday");
        assert!(!open(&wrap, at("2026-12-08 12:00")), "Tuesday");
        // Several windows: open when any is.
        let two = [w("Mon 08:00-09:00"), w("Mon 17:00-18:00")];
        assert!(open(&two, at("2026-12-07 17:30")));
        assert_eq!(
            next_change(&two, at("2026-12-07 08:30")),
            Some(at("2026-12-07 09:00"))
        );
        assert_eq!(
            next_change(&two, at("2026-12-07 09:30")),
            Some(at("2026-12-07 17:00"))
        );
        // No windows: always open, never changes.
        assert!(open(&[], at("2026-12-07 03:00")));
        assert_eq!(next_change(&[], at("2026-12-07 03:00")), None);
        // Always open: never changes either.
        assert_eq!(
            next_change(&[w("00:00-24:00")], at("2026-12-07 03:00")),
            None
        );
    }

    #[test]
    fn bad_windows_say_why() {
        for bad in [
            "",
            "Mon-Fry 07:00-19:00",
            "07:00",
            "25:00-26:00",
            "07:00-07:00",
            "Mon 7-19",
            "a b c",
            "é",
        ] {
            let e = bad.parse::<Window>().unwrap_err();
            assert!(e.contains("Mon-Fri 07:00-19:00"), "{bad}: {e}");
        }
    }
}
