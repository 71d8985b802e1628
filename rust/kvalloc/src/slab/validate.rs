//! The arena's invariants (see the module docs), checked in full.

use super::*;

fn bad<T>(m: String) -> Result<T> {
    Err(Error::Invariant(m))
}

impl SlabArena {
    /// Checks every invariant listed in the module docs; `Err(Error::Invariant)` names the
    /// first violation.
    pub fn validate(&self) -> Result<()> {
        let mut in_free_stack = vec![false; self.slabs.len()];
        for &s in &self.free_slabs {
            let s = s as usize;
            if s >= self.slabs.len() || in_free_stack[s] {
                return bad(format!(
                    "slab {s} is listed twice or out of range in the free stack"
                ));
            }
            in_free_stack[s] = true;
        }
        let mut used_per_class = vec![0u64; self.classes.len()];
        let mut held_per_class = vec![0u32; self.classes.len()];
        let mut current_free = vec![0u64; self.classes.len()];
        for (i, slab) in self.slabs.iter().enumerate() {
            match slab.class {
                None => {
                    let base = i * self.stride as usize;
                    if !in_free_stack[i]
                        || slab.used != 0
                        || self.slots[base..base + self.stride as usize]
                            .iter()
                            .any(|m| m.gen != 0)
                    {
                        return bad(format!("free slab {i} is not cleanly in the free stack"));
                    }
                }
                Some(c) => {
                    let c = c as usize;
                    if in_free_stack[i] || slab.in_batch {
                        return bad(format!("held slab {i} is also in the free stack"));
                    }
                    if self.validate_held_slab(i, slab, c)? {
                        current_free[c] = u64::from(slab.free_len);
                    }
                    used_per_class[c] += u64::from(slab.used);
                    held_per_class[c] += 1;
                }
            }
        }
        for (c, class) in self.classes.iter().enumerate() {
            if class.blocks_in_use != used_per_class[c] || class.slabs_held != held_per_class[c] {
                return bad(format!("class {c}: counters disagree with the slabs"));
            }
            if class.current != NIL
                && self
                    .slabs
                    .get(class.current as usize)
                    .and_then(|sl| sl.class)
                    != Some(c as u32)
            {
                return bad(format!("class {c}: its current slab is not one it holds"));
            }
            if class.blocks_per_slab == 1 && (class.current != NIL || !class.partial.is_empty()) {
                return bad(format!(
                    "class {c}: a one-block-per-slab class has a current or partial slab"
                ));
            }
            let listed: u64 = class.partial.iter().map(|&(f, _)| u64::from(f)).sum();
            if listed + current_free[c] != class.free_in_partial {
                return bad(format!(
                    "class {c}: free-block counter disagrees with its slabs"
                ));
            }
            if class.partial.len() as u32 > class.slabs_held {
                return bad(format!(
                    "class {c}: partial set lists slabs it does not hold"
                ));
            }
        }
        let st = self.stats();
        if st.bytes_free != self.bytes_free() {
            return bad("bytes_free disagrees with the per-class counts".into());
        }
        if st.bytes_in_use + st.bytes_free + st.padding_waste_bytes + st.tail_bytes
            != self.capacity_bytes
        {
            return bad("bytes in use + free + waste != capacity".into());
        }
        Ok(())
    }

    /// Held slab `i` of class `c`: not empty, its used and free counts and generations agree,
    /// its free list is sound, and it is in the partial set exactly when it has room and is not
    /// the class's current slab. Returns whether it is the current slab.
    fn validate_held_slab(&self, i: usize, slab: &Slab, c: usize) -> Result<bool> {
        let class = &self.classes[c];
        if slab.used == 0 {
            return bad(format!("slab {i} is held by class {c} but empty"));
        }
        let base = i * self.stride as usize;
        let bps = class.blocks_per_slab as usize;
        let metas = &self.slots[base..base + self.stride as usize];
        if slab.used as usize + slab.free_len as usize != bps {
            return bad(format!("slab {i}: used + free != blocks per slab"));
        }
        let live = metas[..bps].iter().filter(|m| m.gen != 0).count();
        if live != slab.used as usize
            || metas.iter().any(|m| m.gen & PENDING_FREE != 0)
            || metas[bps..].iter().any(|m| m.gen != 0)
        {
            return bad(format!("slab {i}: live generations disagree with used"));
        }
        let mut seen = vec![false; bps];
        let mut f = slab.free_head;
        let mut n = 0;
        while f != NIL {
            let fu = f as usize;
            if fu >= bps || seen[fu] || metas[fu].gen != 0 || n >= bps {
                return bad(format!("slab {i}: free slot {f} is live or repeated"));
            }
            seen[fu] = true;
            n += 1;
            f = metas[fu].next.wrapping_sub(1);
        }
        if n != slab.free_len as usize {
            return bad(format!(
                "slab {i}: free list length {n} != {}",
                slab.free_len
            ));
        }
        let free = slab.free_len;
        let listed = class.partial.contains(&(free, i as u32));
        let current = class.current == i as u32;
        if (free > 0 && !current) != listed {
            return bad(format!("slab {i}: partial-set membership is wrong"));
        }
        Ok(current)
    }
}
