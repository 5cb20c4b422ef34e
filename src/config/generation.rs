//! `[generation]` and `[dpo]`: the generation methods and their settings.

use super::*;

/// The generation methods (METHOD.md section 4): `config::generation::Method`, beside the
/// classification methods' `config::Method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Single weak, hard labels: cross-entropy on the weak model's top hypothesis (one run per weak model).
    Hard,
    /// Single weak, token-level soft labels (soft KL; one run per weak model).
    Soft,
    /// Naive multi-weak: every weak hypothesis as its own soft-label target, weighted.
    Naive,
    /// Joint decoding: pooled n-best lists rescored by every weak model, the weighted best as target.
    Joint,
    /// Bayesian multi-weak: token-level EDL over every weak hypothesis, weighted.
    Edl,
    /// Token EDL with the student's own predictions mixed in.
    EdlStep,
}

impl Method {
    pub const ALL: [Method; 6] = [
        Method::Hard,
        Method::Soft,
        Method::Naive,
        Method::Joint,
        Method::Edl,
        Method::EdlStep,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Hard => "hard",
            Method::Soft => "soft",
            Method::Naive => "naive",
            Method::Joint => "joint",
            Method::Edl => "edl",
            Method::EdlStep => "edl_step",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationConfig {
    pub methods: Vec<Method>,
    /// "agreement" (learned from the weak models' agreement), "uniform", or a list.
    pub weights: Weights<GenerationWeights>,
    /// The prompt; `{input}` is replaced by the utterance.
    pub prompt: String,
    /// Beam width and n-best size of the weak labels.
    pub weak_beams: usize,
    /// Beam width on test.
    pub test_beams: usize,
    pub max_new_tokens: usize,
    /// Prompts per beam-search batch.
    pub decode_batch: usize,
    /// Test and preference-stage decoding end a hypothesis when the JSON object it opened
    /// closes (as if end-of-sequence followed). The weak n-best lists always run to
    /// end-of-sequence, whose log-probability the word bridge carries to the student.
    pub stop_at_json: bool,
    pub share: crate::seq2seq::bridge::Share,
    pub spread: crate::seq2seq::bridge::Spread,
    /// c of the token-EDL KL annealing (the original: 1e-4).
    pub edl_c: f64,
    /// "exp" (clamped, METHOD.md's default) or "softplus". Softplus evidence over a whole
    /// vocabulary collapsed the students in the CPU run: with alpha = e + 1 the label's share
    /// alpha / S only grows by pushing its logit towards the vocabulary size.
    pub evidence: EvidenceKind,
    pub evidence_clamp: f64,
    pub edl_step_a_max: f64,
    pub edl_step_warmup: f64,
    /// The preference stage after the Bayesian student (METHOD.md section 5).
    pub dpo: Option<DpoConfig>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            methods: Method::ALL.to_vec(),
            weights: Weights::Named(GenerationWeights::Agreement),
            prompt: crate::seq2seq::model::DEFAULT_PROMPT.into(),
            weak_beams: 5,
            test_beams: 3,
            max_new_tokens: 64,
            decode_batch: 8,
            stop_at_json: true,
            share: Default::default(),
            spread: Default::default(),
            edl_c: 1e-4,
            evidence: EvidenceKind::Exp,
            evidence_clamp: 10.0,
            edl_step_a_max: 0.2,
            edl_step_warmup: 0.25,
            dpo: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    /// The student whose outputs are ranked: "edl" or "edl_step".
    pub after: Method,
    /// Size of the student's n-best list per prompt (beam search).
    pub beams: usize,
    pub beta: f64,
    /// Label smoothing of the conservative DPO loss.
    pub eps: f64,
    pub train: TrainConfig,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            after: Method::Edl,
            beams: 10,
            beta: 5.0,
            eps: 0.1,
            train: TrainConfig {
                epochs: 3,
                batch_size: 4,
                lr: 5e-7,
                ..TrainConfig::default()
            },
        }
    }
}
