//! GGUF specifics:
//! - names: `blk.{i}.attn_q.weight` etc. are mapped from the HF names;
//! - RoPE: llama.cpp's converter permutes the rows of Q and K for interleaved RoPE,
//!   `(heads, 2, d/2, in) -> (heads, d/2, 2, in)`; we apply the inverse so the HF half-split
//!   RoPE and HF-trained LoRA factors line up (see `rope.rs`). Rows are independent in GGML
//!   quantized formats, so the inverse is a byte-level row shuffle even for kept weights.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::{gguf_file, QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::Permute;
use crate::error::{io_err, ModelError, Result};

/// Reads a GGUF file's metadata, keeping the file open for tensor reads.
pub(super) fn open(path: &Path) -> Result<(gguf_file::Content, File)> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| {
        ModelError::Config(format!("{}: not a readable GGUF file: {e}", path.display()))
    })?;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(ModelError::Config(
            "GGUF with `rope_freqs` (Llama 3.1 rope scaling) is not supported; use the HF checkpoint".into(),
        ));
    }
    Ok((content, file))
}

/// The tensor stored under HF name `hf`, as the file holds it.
pub(super) fn tensor(
    content: &gguf_file::Content,
    file: &mut File,
    hf: &str,
    device: &Device,
) -> Result<QTensor> {
    let name = gguf_name(hf).ok_or_else(|| ModelError::Weight {
        key: hf.into(),
        msg: "no GGUF equivalent".into(),
    })?;
    content
        .tensor(file, &name, device)
        .map_err(|e| ModelError::Weight {
            key: name.clone(),
            msg: e.to_string(),
        })
}

/// The GGUF name of HF tensor `hf`.
pub(super) fn gguf_name(hf: &str) -> Option<String> {
    if hf == "model.embed_tokens.weight" {
        return Some("token_embd.weight".into());
    }
    if hf == "model.norm.weight" {
        return Some("output_norm.weight".into());
    }
    if hf == "lm_head.weight" {
        return Some("output.weight".into());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let short = match rest {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.weight"))
}

/// Row order that undoes the permutation: output row r takes input row `perm[r]`.
fn unpermute_rows(rows: usize, heads: usize) -> Vec<u32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut perm = vec![0u32; rows];
    for h in 0..heads {
        for c in 0..2 {
            for i in 0..half {
                perm[h * hd + c * half + i] = (h * hd + 2 * i + c) as u32;
            }
        }
    }
    perm
}

/// Undoes the Q/K row permutation of a dense (dequantized) weight.
pub(super) fn unpermute_dense(t: &Tensor, heads: usize) -> Result<Tensor> {
    let perm = Tensor::new(unpermute_rows(t.dim(0)?, heads).as_slice(), t.device())?;
    Ok(t.index_select(&perm, 0)?)
}

/// Checks a kept tensor's shape and undoes llama.cpp's Q/K row permutation on its blocks.
pub(super) fn unpermute_blocks(
    hf: &str,
    qt: QTensor,
    out: usize,
    inp: usize,
    permute: Permute,
) -> Result<QTensor> {
    if qt.shape().dims() != [out, inp] {
        return Err(ModelError::Weight {
            key: hf.into(),
            msg: format!("shape {:?}, expected [{out}, {inp}]", qt.shape().dims()),
        });
    }
    Ok(match permute {
        Permute::None => qt,
        Permute::Heads(h) => {
            let data = qt.data()?;
            let row = data.len() / out;
            let mut shuffled = Vec::with_capacity(data.len());
            for r in unpermute_rows(out, h) {
                let r = r as usize;
                shuffled.extend_from_slice(&data[r * row..(r + 1) * row]);
            }
            let storage =
                QStorage::from_data(std::borrow::Cow::Owned(shuffled), &qt.device(), qt.dtype())?;
            QTensor::new(storage, (out, inp))?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Permuting as llama.cpp's converter does and then applying our inverse is the identity.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, hd) = (3, 8);
        let rows = heads * hd;
        // llama.cpp: reshape(heads, 2, hd/2) -> swap(1, 2): gguf row h*hd + 2i + c holds hf row h*hd + c*hd/2 + i.
        let mut gguf_holds = vec![0usize; rows];
        for h in 0..heads {
            for i in 0..hd / 2 {
                for c in 0..2 {
                    gguf_holds[h * hd + 2 * i + c] = h * hd + c * hd / 2 + i;
                }
            }
        }
        let perm = unpermute_rows(rows, heads);
        let restored: Vec<usize> = perm.iter().map(|&g| gguf_holds[g as usize]).collect();
        assert_eq!(restored, (0..rows).collect::<Vec<_>>());
    }
}
