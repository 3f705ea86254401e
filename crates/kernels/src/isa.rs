//! The instruction sets the kernels use, detected once per process.
//!
//! Tests of a SIMD path skip on a CPU without it, unless `ALORA_REQUIRE_SIMD` names that
//! path (`avx2` or `avx512`): then they fail, so a CI host that has AVX-512 cannot pass by
//! skipping (`.ci/run` sets it from `/proc/cpuinfo`).

use std::sync::OnceLock;

/// The best instruction set of this CPU that the kernels have code for. Each level includes
/// the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust (any target).
    Portable,
    /// x86-64 AVX2 with FMA and F16C (8 lanes).
    Avx2,
    /// x86-64 AVX-512F with AVX2, FMA and F16C (16 lanes).
    Avx512,
}

impl Isa {
    /// This CPU's level (detected on the first call).
    pub fn get() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(Isa::detect)
    }

    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// AVX2 + FMA + F16C are there (also on AVX-512 CPUs).
    pub fn has_avx2() -> bool {
        Isa::get() >= Isa::Avx2
    }

    /// AVX-512F (+ the AVX2 set) is there: the 16-lane kernels run.
    pub fn has_avx512() -> bool {
        Isa::get() >= Isa::Avx512
    }

    /// The level `ALORA_REQUIRE_SIMD` names (`avx2`, `avx512`), if any.
    pub fn required() -> Option<Isa> {
        match std::env::var("ALORA_REQUIRE_SIMD").ok()?.trim() {
            "avx512" => Some(Isa::Avx512),
            "avx2" => Some(Isa::Avx2),
            "" | "0" | "none" => None,
            other => panic!("ALORA_REQUIRE_SIMD={other}: expected avx2 or avx512"),
        }
    }

    /// For tests of a SIMD path: whether `level` runs here. Panics when it does not but
    /// `ALORA_REQUIRE_SIMD` requires it (or a higher level), so such a test cannot pass by
    /// skipping.
    pub fn test_has(level: Isa) -> bool {
        if Isa::get() >= level {
            return true;
        }
        if let Some(req) = Isa::required() {
            assert!(
                req < level,
                "ALORA_REQUIRE_SIMD asks for {req:?} but this CPU has only {:?}",
                Isa::get()
            );
        }
        eprintln!("skipped: this CPU lacks {level:?}");
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_required_level_is_present() {
        assert!(Isa::Portable < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        if let Some(req) = Isa::required() {
            assert!(Isa::get() >= req, "required {req:?}, have {:?}", Isa::get());
        }
    }
}
