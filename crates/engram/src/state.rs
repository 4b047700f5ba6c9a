//! Streaming state of one sequence: what later tokens need from earlier ones.

/// What later tokens of one sequence need from the earlier ones (streaming decode).
///
/// A fresh state is the sequence start: the n-gram history is the pad token and the
/// convolution history is zeros (the reference's implicit left padding).
#[derive(Debug, Clone, PartialEq)]
pub struct EngramState {
    /// Last N-1 canonical ids, oldest first.
    pub(crate) ngram_history: Vec<i64>,
    /// Ring of the last R = (kernel_size-1)·N normalised conv inputs, rows of HC·D
    /// (channel c = i·D + j as in `short_conv.conv`); `conv_head` is the oldest row.
    pub(crate) conv_ring: Vec<f32>,
    pub(crate) conv_head: usize,
    /// Tokens consumed so far.
    pub(crate) position: u64,
    /// HC·D, the width of a conv row.
    pub(crate) row_width: usize,
}

impl EngramState {
    /// Last N-1 canonical ids, oldest first.
    pub fn ngram_history(&self) -> &[i64] {
        &self.ngram_history
    }

    /// Last R normalised conv inputs, oldest first: `[R, HC·D]`.
    pub fn conv_history(&self) -> Vec<f32> {
        let r = self.conv_rows();
        if r == 0 {
            return Vec::new();
        }
        let c = self.conv_ring.len() / r;
        let mut v = Vec::with_capacity(self.conv_ring.len());
        for j in 0..r {
            let p = (self.conv_head + j) % r;
            v.extend_from_slice(&self.conv_ring[p * c..(p + 1) * c]);
        }
        v
    }

    fn conv_rows(&self) -> usize {
        self.conv_ring
            .len()
            .checked_div(self.row_width.max(1))
            .unwrap_or(0)
    }

    /// HC·D: the width of a conv row.
    pub fn row_width(&self) -> usize {
        self.row_width
    }

    /// Tokens consumed so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Rebuilds a state from its parts (e.g. read from disk); sizes are checked when used.
    pub fn from_parts(
        ngram_history: Vec<i64>,
        conv_history: Vec<f32>,
        row_width: usize,
        position: u64,
    ) -> Self {
        EngramState {
            ngram_history,
            conv_ring: conv_history,
            conv_head: 0,
            position,
            row_width,
        }
    }
}
