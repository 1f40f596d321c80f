//! The token embedding: rows of the checkpoint's `[vocab, hidden]` weight,
//! or, where the head is tied to it and packed in panels (float32 on the
//! CPU, `projection.rs`), rows read out of the head's panels, so the weight
//! is held once.

use tch::{Kind, TchError, Tensor};

use super::cpu_matmul::{unpack_row, PANEL};

pub enum Embedding {
    /// `[vocab, hidden]`.
    Rows(Tensor),
    /// The tied head's `[ceil(vocab/16), hidden, 16]` panels (shared).
    Panels { panels: Tensor, vocab: usize },
}

/// The embedding's float32 elements for the CPU decode step.
#[derive(Clone, Copy)]
pub enum EmbedRows<'a> {
    Rows(&'a [f32]),
    Panels(&'a [f32]),
}

impl Embedding {
    /// Embeddings of `ids` (any shape): `[..., hidden]`.
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor, TchError> {
        match self {
            Self::Rows(weight) => Tensor::f_embedding(weight, ids, -1, false, false),
            Self::Panels { panels, vocab } => {
                let ids = ids.f_to_kind(Kind::Int64)?;
                let bad = ids.f_lt(0)?.f_logical_or(&ids.f_ge(*vocab as i64)?)?;
                if bad.f_any()?.f_int64_value(&[])? != 0 {
                    return Err(TchError::Shape(format!(
                        "token id beyond the vocabulary of {vocab}"
                    )));
                }
                let panel = ids.f_floor_divide_scalar(PANEL as i64)?;
                let channel = ids.f_remainder(PANEL as i64)?;
                panels.f_index(&[Some(panel), None, Some(channel)])
            }
        }
    }

    /// Bytes held by the embedding alone (panels are the head's).
    pub fn own_bytes(&self) -> u64 {
        match self {
            Self::Rows(weight) => super::tensor_bytes(weight),
            Self::Panels { .. } => 0,
        }
    }

    /// The elements, where they are float32 on the CPU and hold `vocab`
    /// rows of `hidden`.
    pub fn cpu(&self, vocab: usize, hidden: usize) -> Option<EmbedRows<'_>> {
        match self {
            Self::Rows(weight) => super::floats(weight)
                .filter(|w| w.len() == vocab * hidden)
                .map(EmbedRows::Rows),
            Self::Panels { panels, vocab: v } => super::floats(panels)
                .filter(|w| *v == vocab && w.len() == vocab.div_ceil(PANEL) * PANEL * hidden)
                .map(EmbedRows::Panels),
        }
    }
}

impl EmbedRows<'_> {
    /// Appends token `t`'s `hidden` values to `out` (`t` checked by the
    /// caller against the vocabulary).
    pub fn push_row(&self, t: usize, hidden: usize, out: &mut Vec<f32>) {
        match self {
            Self::Rows(w) => out.extend_from_slice(&w[t * hidden..][..hidden]),
            Self::Panels(w) => {
                let start = out.len();
                out.resize(start + hidden, 0.0);
                unpack_row(w, hidden, t, &mut out[start..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu_matmul::pack;
    use tch::Device;

    #[test]
    fn rows_from_panels_are_the_embedding_rows() {
        // 37 rows: the last panel is partly padding.
        let (vocab, hidden) = (37usize, 24usize);
        let weight = Tensor::randn([vocab as i64, hidden as i64], (Kind::Float, Device::Cpu));
        let packed = Embedding::Panels {
            panels: pack(&weight).unwrap(),
            vocab,
        };
        let rows = Embedding::Rows(weight.shallow_clone());
        let ids = Tensor::from_slice(&[0i64, 36, 17, 15, 16, 5]).view([2, 3]);
        let want = rows.lookup(&ids).unwrap();
        assert_eq!(want.size(), vec![2, 3, hidden as i64]);
        assert!(packed.lookup(&ids).unwrap().equal(&want));
        let cpu = packed.cpu(vocab, hidden).unwrap();
        let mut got = Vec::new();
        for t in [0usize, 36, 17, 15, 16, 5] {
            cpu.push_row(t, hidden, &mut got);
        }
        assert_eq!(got, Vec::<f32>::try_from(want.flatten(0, -1)).unwrap());
        // A wrong size or an id outside the vocabulary is refused.
        assert!(packed.cpu(vocab + 1, hidden).is_none());
        for bad in [37i64, -1] {
            assert!(packed.lookup(&Tensor::from_slice(&[1i64, bad])).is_err());
        }
    }
}
