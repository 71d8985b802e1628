//! What a scheduler hands the manager: prompts, extensions, and whole steps, and what a step
//! gives back.

/// A prompt: token ids, or precomputed block hashes (one per whole block; a trailing partial
/// block's id may be included and is ignored).
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    /// Token ids.
    Tokens(&'a [i64]),
    /// Block hashes plus the prompt's length in tokens.
    BlockHashes {
        /// One id per block of `block_tokens`.
        hashes: &'a [u64],
        /// Prompt length in tokens.
        num_tokens: u64,
    },
}

impl Prompt<'_> {
    pub(super) fn len(&self) -> u64 {
        match self {
            Prompt::Tokens(t) => t.len() as u64,
            Prompt::BlockHashes { num_tokens, .. } => *num_tokens,
        }
    }
}

/// Tokens appended to a running request.
#[derive(Debug, Clone, Copy)]
pub enum Extension<'a> {
    /// New token ids (after the prompt is fully scheduled).
    Tokens(&'a [i64]),
    /// Schedule this many more tokens: the rest of the prompt first (chunked prefill), then, for
    /// requests admitted with block hashes, opaque output tokens.
    Count(u64),
}

/// One decode token for each of many running requests, as two columns: request `ids[k]` gets
/// token `tokens[k]`. The same as `extend` entries `(ids[k], Extension::Tokens(&[tokens[k]]))`,
/// without building a tuple per request (a decode step names every running request, and its
/// extension list was the largest thing a step read and wrote).
///
/// ```
/// use kvalloc::{Decode, KVCacheManager, ManagerConfig, ModelSpec, Prompt, Step};
/// let spec = ModelSpec::preset("mimo-v2.5-pro")?;
/// let mut m = KVCacheManager::new(spec, 40 << 30, ManagerConfig::default())?;
/// for id in 0..3 {
///     let prompt: Vec<i64> = (0..100).map(|t| t + 1000 * id).collect();
///     m.admit(id as u64, Prompt::Tokens(&prompt), None, None)?;
/// }
/// let out = m.step(&Step {
///     finish: vec![2],
///     decode: Decode { ids: &[0, 1], tokens: &[42, 43] },
///     ..Step::default()
/// })?;
/// assert_eq!((out.extensions, out.refused.len()), (2, 0));
/// assert_eq!(m.num_tokens(0)?, 101);
/// # Ok::<(), kvalloc::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Decode<'a> {
    /// Running requests, each at most once per step (counting `extend` and finish/abort too).
    pub ids: &'a [u64],
    /// One token id per request, in the order of `ids`.
    pub tokens: &'a [i64],
}

/// One admission in a batched step ([`Admission::new`] for one with defaults).
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    /// Request id (unique among running requests).
    pub req: u64,
    /// The prompt.
    pub prompt: Prompt<'a>,
    /// Tenant salt: requests with different salts never share KV.
    pub salt: Option<&'a [u8]>,
    /// Schedule at most this many prompt tokens now (chunked prefill); None: all.
    pub max_tokens: Option<u64>,
    /// Priority, pin and cache opt-out (see [`Retention`](super::Retention)).
    pub retention: super::Retention,
}

impl<'a> Admission<'a> {
    /// Admits `req` with `prompt`: no salt, the whole prompt now, default retention.
    pub fn new(req: u64, prompt: Prompt<'a>) -> Self {
        Admission {
            req,
            prompt,
            salt: None,
            max_tokens: None,
            retention: super::Retention::default(),
        }
    }
}

/// A whole scheduler step: finishes and aborts first (they free memory), then extensions of
/// running requests, then admissions.
#[derive(Debug, Clone, Default)]
pub struct Step<'a> {
    /// Requests that finished.
    pub finish: Vec<u64>,
    /// Requests to drop without caching anything.
    pub abort: Vec<u64>,
    /// Running requests to extend.
    pub extend: Vec<(u64, Extension<'a>)>,
    /// Running requests to extend by one token each, after `extend`.
    pub decode: Decode<'a>,
    /// New requests.
    pub admit: Vec<Admission<'a>>,
    /// First come, first served: stop at the first admission that does not fit. The ones after
    /// it are not attempted (`StepOutcome::admitted` ends at the refusal), so a queue whose head
    /// waits for memory costs one refused lookup per step, not one per queued request.
    pub fcfs: bool,
    /// Admit only if every extension fit: a scheduler that must preempt in a step admits
    /// nothing new in it (as vLLM's and SGLang's do), so decode and admissions can share one
    /// call. When an extension is refused no admission is attempted (`StepOutcome::admitted`
    /// is empty).
    pub admit_if_extended: bool,
}

/// What a step did, in the order of its inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutcome {
    /// Extensions attempted: those of `extend`, then those of `decode`.
    pub extensions: usize,
    /// Positions (in that order) of the extensions that did not fit, ascending. A list of the
    /// few refusals rather than a flag per extension: a decode step has hundreds of
    /// extensions and nearly always no refusal.
    pub refused: Vec<usize>,
    /// Per admission attempted: tokens served from cache, or None when it did not fit or waits
    /// for its KV (`waiting`). With [`Step::fcfs`] it ends at the first refusal.
    pub admitted: Vec<Option<u64>>,
    /// Positions in `admitted` of the admissions waiting for their KV to load from disk or the
    /// remote store (see [`KVCacheManager::waiting_for_kv`](super::KVCacheManager::waiting_for_kv)):
    /// admit them again once `ready` names them.
    pub waiting: Vec<usize>,
    /// Requests whose KV finished loading (or whose load failed: their hit shrinks to what
    /// verified) since the last step or [`take_ready`](super::KVCacheManager::take_ready):
    /// admit them again.
    pub ready: Vec<u64>,
}

impl StepOutcome {
    /// Per extension, in order: whether it fit.
    pub fn extended(&self) -> Vec<bool> {
        let mut v = vec![true; self.extensions];
        for &i in &self.refused {
            v[i] = false;
        }
        v
    }
}
