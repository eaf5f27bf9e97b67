//! Reading an engine's Prometheus text exposition (`/metrics`): the samples, by name and labels. Written here
//! because the `prometheus` crate only writes this format; what an engine's gauges need is a line parser.
use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct Samples {
    samples: Vec<Sample>,
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

impl Samples {
    /// Every sample line of `text`; comments and lines that do not parse are skipped.
    pub fn parse(text: &str) -> Self {
        Self { samples: text.lines().filter_map(sample).collect() }
    }

    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name && s.value.is_finite())
    }

    /// The sum over every series of `name` (0 if there is none).
    pub fn sum(&self, name: &str) -> f64 {
        self.named(name).map(|s| s.value).sum()
    }

    /// The mean over every series of `name`, if there is one.
    pub fn mean(&self, name: &str) -> Option<f64> {
        let values: Vec<f64> = self.named(name).map(|s| s.value).collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    }

    /// Only the series of data-parallel rank `rank` (vLLM's label `engine`) and those of no rank.
    pub fn of_rank(self, rank: u32) -> Self {
        let rank = rank.to_string();
        let samples = self.samples.into_iter().filter(|s| s.labels.get("engine").is_none_or(|e| *e == rank)).collect();
        Self { samples }
    }

    /// The labels of the first series of `name` (info gauges carry their facts there).
    pub fn labels_of(&self, name: &str) -> Option<&HashMap<String, String>> {
        self.samples.iter().find(|s| s.name == name).map(|s| &s.labels)
    }
}

/// `name{label="value",...} value [timestamp]`.
fn sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = HashMap::new();
    if let Some(inside) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inside)?;
        labels = parsed;
        rest = after;
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        number => number.parse().ok()?,
    };
    Some(Sample { name, labels, value })
}

/// The labels up to the closing brace, and what follows it. Values are quoted, with `\"`, `\\` and `\n`
/// escaped.
fn parse_labels(mut text: &str) -> Option<(HashMap<String, String>, &str)> {
    let mut labels = HashMap::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = text.find('=')?;
        let key = text[..eq].trim().to_string();
        let mut chars = text[eq + 1..].trim_start().strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            let (at, c) = chars.next()?;
            match c {
                '"' => break at,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    escaped => value.push(escaped),
                },
                c => value.push(c),
            }
        };
        let quoted = text[eq + 1..].trim_start();
        text = &quoted[1 + end + 1..];
        labels.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_gauges_and_info_labels_as_engines_expose_them() {
        let text = "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
                    # TYPE vllm:num_requests_running gauge\n\
                    vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0\n\
                    vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 2.0\n\
                    vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25\n\
                    vllm:cache_config_info{block_size=\"16\",cache_dtype=\"auto\",num_gpu_blocks=\"2048\",note=\"a \\\"q\\\", b\"} 1.0\n\
                    trtllm_num_requests_waiting 7 1712345678000\n\
                    broken{ 3\n\
                    nan_metric NaN\n";
        let samples = Samples::parse(text);
        assert_eq!(samples.sum("vllm:num_requests_running"), 5.0);
        assert_eq!(samples.mean("vllm:kv_cache_usage_perc"), Some(0.25));
        assert_eq!(samples.sum("trtllm_num_requests_waiting"), 7.0);
        let info = samples.labels_of("vllm:cache_config_info").unwrap();
        assert_eq!((info["block_size"].as_str(), info["num_gpu_blocks"].as_str()), ("16", "2048"));
        assert_eq!(info["note"], "a \"q\", b");
        assert_eq!(samples.mean("nan_metric"), None);
        assert_eq!(samples.mean("absent"), None);
    }
}
