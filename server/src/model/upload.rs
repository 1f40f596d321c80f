//! Host values to a device tensor without a stream synchronisation.
//!
//! A copy from ordinary (pageable) host memory to a CUDA device waits for
//! the stream to drain first; a decode step uploads its token ids and
//! positions, so every step would wait for the previous one's kernels
//! before queueing its own. From page-locked memory the copy is queued like
//! a kernel (`non_blocking`); libtorch's caching host allocator keeps the
//! pinned block until the copy has run, so the temporary may be dropped at
//! once. On the CPU the tensor is simply built in place.

use tch::{Device, TchError, Tensor};

/// `values` as a 1-D tensor on `device`.
pub fn upload<T: tch::kind::Element>(values: &[T], device: Device) -> Result<Tensor, TchError> {
    let host = Tensor::from_slice(values);
    if device == Device::Cpu {
        return Ok(host);
    }
    match host.f_pin_memory(device) {
        Ok(pinned) => pinned.f_to_device_(device, pinned.kind(), true, false),
        // Pinning can fail (no pinned memory left, a device type without
        // it): a plain, synchronising copy still gives the right values.
        Err(_) => host.f_to_device(device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_uploads_hold_the_values() {
        let t = upload(&[3i64, 1, 4], Device::Cpu).unwrap();
        assert_eq!(Vec::<i64>::try_from(&t).unwrap(), vec![3, 1, 4]);
        let f = upload(&[0.5f32], Device::Cpu).unwrap();
        assert_eq!(Vec::<f32>::try_from(&f).unwrap(), vec![0.5]);
    }
}
