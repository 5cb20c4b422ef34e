//! Parameters of a model: checkpoint tensors taken by name, as trainable variables or frozen
//! tensors, plus new parameters (heads, LoRA) initialised from the seed.

use crate::rng::Rng;
use candle_core::{DType, Device, Error, Result, Shape, Tensor, Var};
use std::collections::{BTreeMap, HashMap};

/// LoRA settings: rank r, scale alpha / r, dropout on the adapter's input, and the names of the
/// modules that get an adapter (the last component of the checkpoint name, e.g. `q_proj`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f32,
    pub targets: Vec<String>,
}

/// Which checkpoint weights are trained.
#[derive(Debug, Clone, PartialEq)]
pub enum Trainable {
    /// Everything frozen (feature extraction, inference).
    Frozen,
    /// Full fine-tuning.
    All,
    /// The base frozen; LoRA adapters on the target modules are trained.
    Lora(LoraConfig),
}

/// A checkpoint tensor read when first asked for (GGUF: de-quantised then), so that a model's
/// f32 weights need not all exist at once.
pub type LazyTensor = Box<dyn Fn() -> Result<Tensor> + Send + Sync>;

pub struct Params {
    tensors: HashMap<String, Tensor>,
    /// Tensors not read yet; moved to `tensors` when taken (or, for layers packed as they are
    /// built, dropped after packing).
    lazy: HashMap<String, LazyTensor>,
    pub(super) trainable: Trainable,
    vars: BTreeMap<String, Var>,
    rng: Rng,
    device: Device,
    /// Where the tensors came from, for error messages.
    source: String,
    /// Checkpoint tensors used so far: name -> (element count, stored dtype).
    used: BTreeMap<String, (usize, DType)>,
    /// When set, missing checkpoint tensors are created: norm scales 1, biases 0, other weights
    /// normal with this standard deviation (for benchmarks of model shapes without checkpoints).
    random_init: Option<f64>,
    /// The type of frozen checkpoint weights (f32; bf16 on a GPU). Trained ones are f32.
    frozen_dtype: DType,
    /// See [`Params::with_packing`].
    pack: Option<crate::ops::Precision>,
    /// Tables kept quantised ([`Params::keep_quantised`]).
    quantised: HashMap<String, super::gguf::QuantRows>,
}

impl Params {
    pub fn new(
        tensors: HashMap<String, Tensor>,
        trainable: Trainable,
        seed: u64,
        device: &Device,
        source: &str,
    ) -> Self {
        Params {
            tensors,
            trainable,
            vars: BTreeMap::new(),
            rng: Rng::derived(seed, "params"),
            device: device.clone(),
            source: source.to_string(),
            used: BTreeMap::new(),
            random_init: None,
            frozen_dtype: DType::F32,
            pack: None,
            lazy: HashMap::new(),
            quantised: HashMap::new(),
        }
    }

    /// Parameters whose checkpoint tensors are read when first taken.
    pub fn lazy(
        lazy: HashMap<String, LazyTensor>,
        trainable: Trainable,
        seed: u64,
        device: &Device,
        source: &str,
    ) -> Self {
        Params {
            lazy,
            ..Params::new(HashMap::new(), trainable, seed, device, source)
        }
    }

    /// Frozen linear layers are packed for `precision` as they are built and keep no f32 copy
    /// (inference only; int8 and bf16x2 pack).
    pub fn with_packing(mut self, precision: crate::ops::Precision) -> Self {
        self.pack = Some(precision);
        self
    }

    /// `name`'s table is kept as these quantised rows by [`Params::table`] (a frozen model
    /// packed for inference on the CPU only; otherwise ignored).
    pub fn keep_quantised(&mut self, name: &str, rows: super::gguf::QuantRows) {
        if self.keeps_quantised() {
            self.quantised.insert(name.to_string(), rows);
        }
    }

    /// Whether [`Params::keep_quantised`] keeps tables quantised.
    pub fn keeps_quantised(&self) -> bool {
        self.pack.is_some() && self.trainable == Trainable::Frozen && self.device.is_cpu()
    }

    /// An embedding table [V, H]: its quantised rows where [`Params::keep_quantised`]
    /// gave them (the f32 table is then not read), else [`Params::weight`].
    pub fn table(&mut self, name: &str, shape: &[usize]) -> Result<super::nn::Table> {
        if let Some(rows) = self.quantised.remove(name) {
            let (v, h) = rows.dims();
            if [v, h] != shape {
                return Err(self.shape_error(name, &[v, h], shape));
            }
            self.lazy.remove(name);
            self.used.insert(name.to_string(), (v * h, DType::F32));
            return Ok(super::nn::Table::rows(rows));
        }
        Ok(super::nn::Table::Dense(self.weight(name, shape)?))
    }

    /// The precision frozen linear layers are packed in as they are built, if any.
    pub fn packing(&self) -> Option<crate::ops::Precision> {
        self.pack
    }

    /// Frozen checkpoint weights in `dtype` (bf16 on a GPU); trained weights stay f32.
    pub fn with_frozen_dtype(mut self, dtype: DType) -> Self {
        self.frozen_dtype = dtype;
        self
    }

    /// Parameters for a model of a given shape with random weights (no checkpoint).
    pub fn random(trainable: Trainable, seed: u64, std: f64, device: &Device) -> Self {
        let mut params = Params::new(
            HashMap::new(),
            trainable,
            seed,
            device,
            "random initialisation",
        );
        params.random_init = Some(std);
        params
    }

    fn random_tensor(&mut self, name: &str, shape: &[usize], std: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let is_norm = name.contains("norm") || name.contains("LayerNorm") || name.contains(".ln_");
        let values: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if is_norm {
            vec![1.0; n]
        } else {
            (0..n)
                .map(|_| {
                    // Box-Muller
                    let u1 = self.rng.next_f64().max(1e-12);
                    let u2 = self.rng.next_f64();
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
                })
                .collect()
        };
        let tensor = Tensor::from_vec(values, Shape::from(shape), &self.device)?;
        self.tensors.insert(name.to_string(), tensor.clone());
        Ok(tensor)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.lazy.contains_key(name)
    }

    /// A checkpoint tensor, checked against the expected shape, as f32. A lazy tensor is read
    /// now and kept for later takes unless `once` (a layer that packs it and lets it go).
    fn take_as(&mut self, name: &str, shape: &[usize], once: bool) -> Result<Tensor> {
        if let (Some(std), false) = (self.random_init, self.contains(name)) {
            self.random_tensor(name, shape, std)?;
        }
        let tensor = if let Some(t) = self.tensors.get(name) {
            t.clone()
        } else if let Some(read) = self.lazy.remove(name) {
            let t = read()?;
            if !once {
                self.tensors.insert(name.to_string(), t.clone());
            }
            t
        } else {
            return Err(Error::Msg(format!(
                "{}: tensor `{name}` is missing from the checkpoint",
                self.source
            )));
        };
        if once {
            // Whoever packs it holds the only reference: its f32 values go when it is packed.
            self.tensors.remove(name);
        }
        if tensor.dims() != shape {
            return Err(self.shape_error(name, tensor.dims(), shape));
        }
        self.used
            .insert(name.to_string(), (tensor.elem_count(), tensor.dtype()));
        tensor.to_dtype(DType::F32)?.to_device(&self.device)
    }

    /// The checkpoint's tensor `name` has shape `got` where the config implies `want`.
    fn shape_error(&self, name: &str, got: &[usize], want: &[usize]) -> Error {
        Error::Msg(format!(
            "{}: tensor `{name}` has shape {got:?}, expected {want:?} from the config",
            self.source
        ))
    }

    /// Number of checkpoint parameters the network uses (tied weights counted once) and the
    /// stored dtypes with their tensor counts.
    pub fn checkpoint_summary(&self) -> (usize, BTreeMap<String, usize>) {
        let total = self.used.values().map(|(n, _)| n).sum();
        let mut dtypes = BTreeMap::new();
        for (_, dtype) in self.used.values() {
            *dtypes
                .entry(format!("{dtype:?}").to_lowercase())
                .or_insert(0) += 1;
        }
        (total, dtypes)
    }

    /// A checkpoint weight: a trainable variable under full fine-tuning, else a frozen tensor.
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weight_as(name, shape, false)
    }

    /// [`Params::weight`]; with `once`, a frozen checkpoint tensor is not kept here after it is
    /// returned (a layer packed as it is built is then its only holder).
    pub fn weight_as(&mut self, name: &str, shape: &[usize], once: bool) -> Result<Tensor> {
        let once = once && self.trainable != Trainable::All;
        let tensor = self.take_as(name, shape, once)?;
        if self.trainable == Trainable::All {
            if let Some(var) = self.vars.get(name) {
                return Ok(var.as_tensor().clone());
            }
            let var = Var::from_tensor(&tensor)?;
            let out = var.as_tensor().clone();
            self.vars.insert(name.to_string(), var);
            return Ok(out);
        }
        tensor.to_dtype(self.frozen_dtype)
    }

    /// A new trainable parameter, uniform in [-bound, bound] (bound 0: zeros), drawn from the seed.
    pub fn new_var(&mut self, name: &str, shape: &[usize], bound: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| ((self.rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let var = Var::from_tensor(&Tensor::from_vec(values, Shape::from(shape), &self.device)?)?;
        let out = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        Ok(out)
    }

    /// The trainable variables by name.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    pub fn into_vars(self) -> BTreeMap<String, Var> {
        self.vars
    }
}
