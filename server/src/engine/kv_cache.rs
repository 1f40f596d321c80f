//! The KV cache: per layer, one preallocated key and one value tensor of
//! `[max_batch, kv_heads, max_context, head_dim]`. A running sequence owns
//! one slot; running sequences always occupy slots `0..B` (a finished
//! sequence's slot is refilled by moving the last one into it), so attention
//! reads a plain view of the cache, never a gathered copy.
//!
//! The cache may hold its elements in a narrower dtype than the model
//! computes in (`kv_cache_dtype`, e.g. float16 beside float32 weights):
//! writes round into it, and the views the tensor-op paths read are widened
//! back to the model's dtype; the CPU decode step reads it in place.

use tch::{Device, Kind, TchError, Tensor};

use crate::model::kv_element::KvElement;

pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    max_batch: usize,
    /// The dtype the model computes in, which views are returned in.
    compute: Kind,
}

impl KvCache {
    /// Allocates the whole cache up front, its elements in the model's
    /// dtype `kind`; an allocation failure (out of memory) is an error, not
    /// a panic.
    pub fn new(
        layers: usize,
        max_batch: usize,
        kv_heads: usize,
        max_context: usize,
        head_dim: usize,
        device: Device,
        kind: Kind,
    ) -> Result<Self, TchError> {
        let shape = (layers, max_batch, kv_heads, max_context, head_dim);
        Self::stored_as(shape, device, kind, kind)
    }

    /// As [`new`](Self::new) for `(layers, max_batch, kv_heads,
    /// max_context, head_dim)`, the elements stored as `storage` for a
    /// model that computes in `compute`.
    pub fn stored_as(
        (layers, max_batch, kv_heads, max_context, head_dim): (usize, usize, usize, usize, usize),
        device: Device,
        compute: Kind,
        storage: Kind,
    ) -> Result<Self, TchError> {
        let shape = [
            max_batch as i64,
            kv_heads as i64,
            max_context as i64,
            head_dim as i64,
        ];
        let mut keys = Vec::with_capacity(layers);
        let mut values = Vec::with_capacity(layers);
        for _ in 0..layers {
            keys.push(Tensor::f_zeros(shape, (storage, device))?);
            values.push(Tensor::f_zeros(shape, (storage, device))?);
        }
        Ok(Self {
            keys,
            values,
            max_batch,
            compute,
        })
    }

    /// The dtype the elements are stored in.
    pub fn storage_kind(&self) -> Kind {
        self.keys.first().map_or(self.compute, Tensor::kind)
    }

    /// Bytes one sequence of `max_context` tokens takes in the cache.
    pub fn bytes_per_sequence(
        layers: usize,
        kv_heads: usize,
        max_context: usize,
        head_dim: usize,
        kind: Kind,
    ) -> u64 {
        (2 * layers * kv_heads * max_context * head_dim * kind.elt_size_in_bytes()) as u64
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Positions a slot holds.
    pub fn max_context(&self) -> usize {
        self.keys.first().map_or(0, |k| k.size()[2] as usize)
    }

    /// Every layer's keys and values as slices of `E` laid out
    /// `[max_batch, kv_heads, max_context, head_dim]`, where the cache is
    /// on the CPU and stored as `E` (the CPU decode step reads and writes
    /// them in place, all layers in one parallel region).
    pub fn cpu_layers_mut<E: KvElement>(&mut self) -> Option<Vec<(&mut [E], &mut [E])>> {
        let all_e = self
            .keys
            .iter()
            .chain(&self.values)
            .all(|t| crate::model::is_cpu_of(t, E::KIND));
        if !all_e {
            return None;
        }
        let slice = |t: &Tensor| {
            // SAFETY: contiguous CPU tensors of numel elements of E's dtype
            // (E is one of the dtype's Rust types), each its own
            // allocation, borrowed mutably through `&mut self`.
            unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut E, t.numel()) }
        };
        Some(
            self.keys
                .iter()
                .zip(&self.values)
                .map(|(k, v)| (slice(k), slice(v)))
                .collect(),
        )
    }

    /// Stores the keys and values of N prompts (`[N, kv_heads, T, head_dim]`)
    /// at positions `start..start + T` of slots `first_slot..first_slot + N`.
    pub fn write_prompts(
        &mut self,
        layer: usize,
        first_slot: usize,
        start: i64,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(), TchError> {
        let (n, t) = (k.size()[0], k.size()[2]);
        self.keys[layer]
            .f_narrow(0, first_slot as i64, n)?
            .f_narrow(2, start, t)?
            .f_copy_(k)?;
        self.values[layer]
            .f_narrow(0, first_slot as i64, n)?
            .f_narrow(2, start, t)?
            .f_copy_(v)?;
        Ok(())
    }

    /// Keys and values of positions `0..len` of one slot, `[1, kv_heads,
    /// len, head_dim]` each (views, or widened copies as for
    /// [`view`](Self::view)).
    pub fn slot_view(
        &self,
        layer: usize,
        slot: usize,
        len: i64,
    ) -> Result<(Tensor, Tensor), TchError> {
        self.slots(layer, slot as i64, 1, len)
    }

    /// Keys and values of slots `first..first + count`, positions `0..len`,
    /// in the model's dtype.
    fn slots(
        &self,
        layer: usize,
        first: i64,
        count: i64,
        len: i64,
    ) -> Result<(Tensor, Tensor), TchError> {
        let part =
            |cache: &Tensor| self.widened(cache.f_narrow(0, first, count)?.f_narrow(2, 0, len)?);
        Ok((part(&self.keys[layer])?, part(&self.values[layer])?))
    }

    /// A view of the cache in the model's dtype: itself, or a widened copy
    /// where the cache is stored narrower.
    fn widened(&self, view: Tensor) -> Result<Tensor, TchError> {
        if view.kind() == self.compute {
            Ok(view)
        } else {
            view.f_to_kind(self.compute)
        }
    }

    /// Stores one step's keys and values (`[B, kv_heads, 1, head_dim]`) at
    /// `position` of slots `0..B`: every sequence is at the same position.
    pub fn write_position(
        &mut self,
        layer: usize,
        position: i64,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(), TchError> {
        let b = k.size()[0];
        self.keys[layer]
            .f_narrow(0, 0, b)?
            .f_narrow(2, position, 1)?
            .f_copy_(k)?;
        self.values[layer]
            .f_narrow(0, 0, b)?
            .f_narrow(2, position, 1)?
            .f_copy_(v)?;
        Ok(())
    }

    /// Stores one new token per sequence (`[B, kv_heads, 1, head_dim]`) for
    /// slots `slots[b]` at positions `positions[b]`.
    pub fn write_step(
        &mut self,
        layer: usize,
        slots: &Tensor,
        positions: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(), TchError> {
        let index = [Some(slots), None, Some(positions)];
        let kind = self.storage_kind();
        let (k, v) = (k.f_to_kind(kind)?, v.f_to_kind(kind)?);
        let _ = self.keys[layer].f_index_put_(&index, &k.f_squeeze_dim(2)?, false)?;
        let _ = self.values[layer].f_index_put_(&index, &v.f_squeeze_dim(2)?, false)?;
        Ok(())
    }

    /// Keys and values of slots `0..batch`, positions `0..len`, as views
    /// (widened copies where the cache is stored narrower than the model).
    pub fn view(&self, layer: usize, batch: i64, len: i64) -> Result<(Tensor, Tensor), TchError> {
        self.slots(layer, 0, batch, len)
    }

    /// Copies the first `len` positions of slot `from` into slot `to`.
    pub fn move_slot(&mut self, from: usize, to: usize, len: usize) -> Result<(), TchError> {
        if from == to || len == 0 {
            return Ok(());
        }
        for cache in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let src = cache
                .f_narrow(0, from as i64, 1)?
                .f_narrow(2, 0, len as i64)?;
            cache
                .f_narrow(0, to as i64, 1)?
                .f_narrow(2, 0, len as i64)?
                .f_copy_(&src)?;
        }
        Ok(())
    }

    /// Bytes the keys and values of one token take, over every layer.
    pub fn bytes_per_token(&self) -> u64 {
        let size = self.keys[0].size();
        let kind = self.keys[0].kind();
        Self::bytes_per_sequence(self.keys.len(), size[1] as usize, 1, size[3] as usize, kind)
    }

    /// A copy of positions `0..len` of `slot`: every layer's keys, then every
    /// layer's values, as one `[2 * layers, kv_heads, len, head_dim]` tensor.
    pub fn copy_out(&self, slot: usize, len: usize) -> Result<Tensor, TchError> {
        let rows = self
            .keys
            .iter()
            .chain(&self.values)
            .map(|cache| cache.f_select(0, slot as i64)?.f_narrow(1, 0, len as i64))
            .collect::<Result<Vec<_>, _>>()?;
        Tensor::f_stack(&rows, 0)
    }

    /// Writes positions `0..len` of `rows` (as [`copy_out`](Self::copy_out)
    /// returns them) into positions `0..len` of `slot`.
    pub fn copy_in(&mut self, slot: usize, rows: &Tensor, len: usize) -> Result<(), TchError> {
        for (i, cache) in self
            .keys
            .iter_mut()
            .chain(self.values.iter_mut())
            .enumerate()
        {
            cache
                .f_select(0, slot as i64)?
                .f_narrow(1, 0, len as i64)?
                .f_copy_(&rows.f_select(0, i as i64)?.f_narrow(1, 0, len as i64)?)?;
        }
        Ok(())
    }
}
