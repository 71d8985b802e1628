//! An ordered set that keeps its smallest element outside its B-tree.
//!
//! Eviction takes the smallest entry, and removing a leaf often makes its parent the next
//! smallest (a prefix node with no checkpoint has the lowest possible key): the parent is
//! filed and taken again at once. Holding the smallest element in a slot makes that pair of
//! operations O(1) instead of a B-tree insert and remove.

use std::collections::BTreeSet;

/// A set of `T`s with [`BTreeSet`]'s answers.
///
/// Invariant: when `head` holds an element, it is smaller than every element of `rest`.
#[derive(Debug, Clone)]
pub struct MinSet<T: Ord + Copy> {
    head: Option<T>,
    rest: BTreeSet<T>,
}

impl<T: Ord + Copy> Default for MinSet<T> {
    fn default() -> Self {
        MinSet {
            head: None,
            rest: BTreeSet::new(),
        }
    }
}

impl<T: Ord + Copy> MinSet<T> {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `x`; false if it was already there.
    pub fn insert(&mut self, x: T) -> bool {
        match self.head {
            Some(h) if x == h => false,
            Some(h) if x < h => {
                self.rest.insert(h);
                self.head = Some(x);
                true
            }
            Some(_) => self.rest.insert(x),
            None if self.rest.first().is_none_or(|f| x < *f) => {
                self.head = Some(x);
                true
            }
            None => self.rest.insert(x),
        }
    }

    /// Removes `x`; false if it was not there.
    pub fn remove(&mut self, x: &T) -> bool {
        if self.head.as_ref() == Some(x) {
            self.head = None;
            true
        } else {
            self.rest.remove(x)
        }
    }

    /// The smallest element.
    pub fn first(&self) -> Option<T> {
        self.head.or_else(|| self.rest.first().copied())
    }

    /// Whether `x` is in the set.
    pub fn contains(&self, x: &T) -> bool {
        self.head.as_ref() == Some(x) || self.rest.contains(x)
    }

    /// The elements, smallest first.
    pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
        self.head.into_iter().chain(self.rest.iter().copied())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.rest.len() + usize::from(self.head.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_smallest_comes_first_wherever_it_is_kept() {
        let mut s = MinSet::new();
        assert!(s.len() == 0 && s.first().is_none());
        assert!(s.insert(5) && s.insert(7) && s.insert(3) && !s.insert(3) && !s.insert(7));
        assert_eq!((s.first(), s.len()), (Some(3), 3));
        assert!(s.remove(&3) && !s.remove(&3));
        assert_eq!(s.first(), Some(5));
        assert!(s.insert(4));
        assert_eq!(s.first(), Some(4));
        assert!(s.contains(&4) && s.contains(&5) && s.contains(&7) && !s.contains(&3));
    }

    proptest! {
        /// Any sequence of inserts and removes answers as a BTreeSet does.
        #[test]
        fn answers_as_a_btreeset(ops in proptest::collection::vec((any::<bool>(), 0u8..24), 0..200)) {
            let mut s = MinSet::new();
            let mut reference = BTreeSet::new();
            for (insert, x) in ops {
                if insert {
                    prop_assert_eq!(s.insert(x), reference.insert(x));
                } else {
                    prop_assert_eq!(s.remove(&x), reference.remove(&x));
                }
                prop_assert_eq!(s.first(), reference.first().copied());
                prop_assert_eq!(s.len(), reference.len());
                prop_assert!(s.iter().eq(reference.iter().copied()));
                for y in 0u8..24 {
                    prop_assert_eq!(s.contains(&y), reference.contains(&y));
                }
            }
        }
    }
}
