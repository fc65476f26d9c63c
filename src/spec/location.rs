//! Input locations of the definition language that carry more than a
//! path: a Kafka topic's (`kafka://HOST:PORT[,HOST:PORT]/TOPIC[?group=NAME&until=end]`),
//! parsed once for `segflow check` and for the run (see
//! [`crate::io::sources::kafka`] for how a topic is read).

/// The consumer group offsets are committed to without `group=`.
pub const DEFAULT_GROUP: &str = "segflow";

/// A Kafka input, as given: `kafka://HOST:PORT[,HOST:PORT]/TOPIC[?group=NAME&until=end]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaInput {
    /// `host:port[,host:port]`.
    pub brokers: String,
    /// The topic.
    pub topic: String,
    /// The consumer group offsets are committed to.
    pub group: String,
    /// `until=end`: read each partition until the reader catches up with
    /// its end, then end.
    pub bounded: bool,
    /// What is wrong with the location, if anything (refused when the run
    /// starts, with this reason).
    pub problem: Option<String>,
}

impl KafkaInput {
    /// Parses what follows `kafka://`.
    pub fn parse(rest: &str) -> KafkaInput {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (brokers, topic) = path.split_once('/').unwrap_or((path, ""));
        let mut input = KafkaInput {
            brokers: brokers.to_string(),
            topic: topic.trim_end_matches('/').to_string(),
            group: DEFAULT_GROUP.to_string(),
            bounded: false,
            problem: None,
        };
        let mut problems = Vec::new();
        if input.brokers.is_empty() {
            problems.push("it names no broker (kafka://HOST:PORT/TOPIC)".to_string());
        }
        // Kafka's own rule for topic names: 1 to 249 of [a-zA-Z0-9._-],
        // not `.` or `..`.
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        let topic = &input.topic;
        if topic.is_empty()
            || topic.len() > 249
            || !topic.chars().all(legal)
            || topic == "."
            || topic == ".."
        {
            problems.push(format!(
                "`{topic}` is not a topic name (kafka://HOST:PORT/TOPIC; 1 to 249 letters, digits, `.`, `_` or `-`)"
            ));
        }
        for broker in input
            .brokers
            .split(',')
            .filter(|_| !input.brokers.is_empty())
        {
            let port = broker
                .rsplit_once(':')
                .map(|(host, p)| (host, p.parse::<u16>()));
            if !matches!(port, Some((host, Ok(p))) if p > 0 && !host.is_empty()) {
                problems.push(format!(
                    "broker `{broker}` is not HOST:PORT (a host, and a port from 1 to 65535)"
                ));
            }
        }
        let mut seen = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            if seen.contains(&key) {
                problems.push(format!("`{key}` is given more than once"));
            }
            seen.push(key);
            match pair.split_once('=') {
                Some(("group", "")) => problems.push(
                    "`group=` names no consumer group (group=NAME; the default is segflow)"
                        .to_string(),
                ),
                Some(("group", g)) => input.group = g.to_string(),
                Some(("until", "end")) => input.bounded = true,
                Some(("until", other)) => problems.push(format!(
                    "`until={other}`: the only end a Kafka source knows is `until=end` (each partition read until the reader catches up with its end)"
                )),
                _ => problems.push(format!(
                    "unknown parameter `{pair}` (known: group=NAME, until=end)"
                )),
            }
        }
        if !problems.is_empty() {
            input.problem = Some(problems.join("; "));
        }
        input
    }

    /// `kafka://HOST:PORT/TOPIC`, how the input is named.
    pub fn describe(&self) -> String {
        format!("kafka://{}/{}", self.brokers, self.topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Locations: brokers, topic, group, bound; what is wrong is said.
    #[test]
    fn locations_parse_and_say_what_is_wrong() {
        let k = KafkaInput::parse("127.0.0.1:9092,h2:9093/web?group=g1&until=end");
        assert_eq!(
            (k.brokers.as_str(), k.topic.as_str(), k.group.as_str()),
            ("127.0.0.1:9092,h2:9093", "web", "g1")
        );
        assert!(k.bounded && k.problem.is_none());
        let k = KafkaInput::parse("h:1/web");
        assert_eq!((k.group.as_str(), k.bounded), (DEFAULT_GROUP, false));
        assert!(KafkaInput::parse("h:1").problem.unwrap().contains("topic"));
        assert!(KafkaInput::parse("/web")
            .problem
            .unwrap()
            .contains("broker"));
        assert!(KafkaInput::parse("h:1/web?until=forever")
            .problem
            .unwrap()
            .contains("until=end"));
        assert!(KafkaInput::parse("h:1/web?from=latest")
            .problem
            .unwrap()
            .contains("unknown parameter `from=latest`"));
        for bad in [
            "h/web",
            "h:notaport/web",
            "h:99999/web",
            "h:0/web",
            ":1/web",
            "h:1,/web",
        ] {
            assert!(
                KafkaInput::parse(bad)
                    .problem
                    .unwrap()
                    .contains("HOST:PORT"),
                "{bad}"
            );
        }
        for bad in ["h:1/we b", "h:1/..", "h:1/wéb"] {
            assert!(
                KafkaInput::parse(bad)
                    .problem
                    .unwrap()
                    .contains("not a topic name"),
                "{bad}"
            );
        }
        assert!(KafkaInput::parse("h:1/web.events_v-2").problem.is_none());
        assert!(KafkaInput::parse("h:1/web?group=a&group=b")
            .problem
            .unwrap()
            .contains("more than once"));
    }
}
