//! `[methods]`: the classification methods, their weights and evidence settings, and the
//! method names the config accepts.

use super::*;

pub(super) fn default_max_tokens() -> usize {
    256
}

pub(super) fn default_probe() -> TrainConfig {
    TrainConfig {
        epochs: 30,
        batch_size: 64,
        lr: 1e-2,
        warmup_ratio: 0.0,
        ..TrainConfig::default()
    }
}

/// The methods compared, and their settings (METHOD.md section 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MethodsConfig {
    pub list: Vec<Method>,
    /// Weights of the weak models: "uniform", "dawid_skene" (learned from agreement), or a list.
    pub weights: Weights<ClassifyWeights>,
    pub logconf_a_max: f64,
    pub logconf_warmup: f64,
    /// c of the KL annealing lambda_t = c min(1, t).
    pub edl_c: f64,
    pub edl_step_a_max: f64,
    pub edl_step_warmup: f64,
    /// "exp" (clamped) or "softplus".
    pub evidence: EvidenceKind,
    pub evidence_clamp: f64,
}

impl Default for MethodsConfig {
    fn default() -> Self {
        MethodsConfig {
            list: Method::ALL.to_vec(),
            weights: Weights::Named(ClassifyWeights::Uniform),
            logconf_a_max: 0.5,
            logconf_warmup: 0.2,
            edl_c: 1e-2,
            edl_step_a_max: 0.2,
            edl_step_warmup: 0.25,
            evidence: EvidenceKind::Exp,
            evidence_clamp: 10.0,
        }
    }
}

/// The evidence function of the EDL losses (METHOD.md section 3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvidenceKind {
    /// exp(min(logit, clamp)).
    Exp,
    /// softplus(logit).
    Softplus,
}

impl EvidenceKind {
    /// The evidence function with its clamp (used by `exp` only).
    pub fn with_clamp(self, clamp: f64) -> crate::losses::Evidence {
        match self {
            EvidenceKind::Exp => crate::losses::Evidence::Exp { clamp },
            EvidenceKind::Softplus => crate::losses::Evidence::Softplus,
        }
    }
}

/// A named rule for the weights of the weak models, for one kind of task.
pub trait WeightRule: Sized + Copy {
    /// Every name, as written in a config.
    const NAMES: &'static [&'static str];
    fn from_index(index: usize) -> Self;
    fn index(self) -> usize;
    fn name(self) -> &'static str {
        Self::NAMES[self.index()]
    }
}

/// Classification: the weights of METHOD.md section 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifyWeights {
    Uniform,
    /// Learned from the weak models' agreement (Dawid-Skene accuracies).
    DawidSkene,
}

impl WeightRule for ClassifyWeights {
    const NAMES: &'static [&'static str] = &["uniform", "dawid_skene"];
    fn from_index(index: usize) -> Self {
        [ClassifyWeights::Uniform, ClassifyWeights::DawidSkene][index]
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// Generation: the weights of METHOD.md section 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationWeights {
    /// Learned from the weak models' agreement on each other's hypotheses.
    Agreement,
    Uniform,
}

impl WeightRule for GenerationWeights {
    const NAMES: &'static [&'static str] = &["agreement", "uniform"];
    fn from_index(index: usize) -> Self {
        [GenerationWeights::Agreement, GenerationWeights::Uniform][index]
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// The `weights` key: a named rule, or one number per weak model.
#[derive(Debug, Clone, PartialEq)]
pub enum Weights<R> {
    Named(R),
    Given(Vec<f64>),
}

impl<R: WeightRule> Serialize for Weights<R> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Weights::Named(rule) => s.serialize_str(rule.name()),
            Weights::Given(w) => w.serialize(s),
        }
    }
}

impl<'de, R: WeightRule> Deserialize<'de> for Weights<R> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit<R>(std::marker::PhantomData<R>);
        impl<'de, R: WeightRule> serde::de::Visitor<'de> for Visit<R> {
            type Value = Weights<R>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "{} or a list of one number per weak model",
                    quoted(R::NAMES)
                )
            }
            fn visit_str<E: serde::de::Error>(
                self,
                v: &str,
            ) -> std::result::Result<Self::Value, E> {
                match R::NAMES.iter().position(|n| *n == v) {
                    Some(i) => Ok(Weights::Named(R::from_index(i))),
                    None => Err(E::custom(format!(
                        "`{v}` is not one of {} or a list of one number per weak model",
                        quoted(R::NAMES)
                    ))),
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut w = Vec::new();
                while let Some(v) = seq.next_element::<f64>()? {
                    w.push(v);
                }
                Ok(Weights::Given(w))
            }
        }
        d.deserialize_any(Visit(std::marker::PhantomData))
    }
}

pub(super) fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Single weak, soft-label cross-entropy (one run per weak model).
    Xent,
    /// Single weak, auxiliary confidence loss (one run per weak model).
    Logconf,
    /// Single weak, product loss (one run per weak model).
    Product,
    /// Naive multi-weak: sum_j w_j CE(y_j, p).
    Naive,
    /// Joint label: weighted average of the soft labels.
    JointAverage,
    /// Joint label: weighted majority vote.
    JointVote,
    /// Joint label: Dawid-Skene posterior.
    JointDawidSkene,
    /// Bayesian multi-weak (EDL).
    Edl,
    /// EDL with the student's own predictions mixed in.
    EdlStep,
    /// Dirichlet-multinomial on the weak hard-label counts.
    DirichletMultinomial,
}

impl Method {
    pub const ALL: [Method; 10] = [
        Method::Xent,
        Method::Logconf,
        Method::Product,
        Method::Naive,
        Method::JointAverage,
        Method::JointVote,
        Method::JointDawidSkene,
        Method::Edl,
        Method::EdlStep,
        Method::DirichletMultinomial,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Xent => "xent",
            Method::Logconf => "logconf",
            Method::Product => "product",
            Method::Naive => "naive",
            Method::JointAverage => "joint_average",
            Method::JointVote => "joint_vote",
            Method::JointDawidSkene => "joint_dawid_skene",
            Method::Edl => "edl",
            Method::EdlStep => "edl_step",
            Method::DirichletMultinomial => "dirichlet_multinomial",
        }
    }
}

/// The dotted key of the `key = value` line holding byte `offset` of a TOML text: its table
/// header (`[a.b]` or `[[a]]`) and its own key (None for a header line or a parse failure).
pub(super) fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?.trim();
    let own = line.split_once('=')?.0.trim();
    if own.is_empty() || own.starts_with('[') {
        return None;
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match table {
        Some(t) => format!("{t}.{own}"),
        None => own.to_string(),
    })
}

pub(super) fn gen_method_names() -> String {
    quoted(&super::generation::Method::ALL.map(super::generation::Method::as_str))
}
