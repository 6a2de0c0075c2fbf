//! Whether a value about to be stored as JSON holds a NaN or an infinity, which
//! serde_json writes as `null` and then cannot read back into an `f64`.
//!
//! A [`serde::Serializer`] that writes nothing: it walks the value as serialization
//! would and stops at the first non-finite float. Walking costs a fraction of reading the
//! serialized bytes back (a decision carries a dozen content items), which is what the
//! check used to do on every stored decision.

use std::fmt::Display;

use serde::ser::{self, Serialize};

/// The first non-finite float in `value`, if any.
pub(super) fn non_finite<T: Serialize + ?Sized>(value: &T) -> Option<f64> {
    match value.serialize(Walk) {
        Ok(()) => None,
        Err(Found(Some(x))) => Some(x),
        // A type whose serialization fails on its own: serde_json will report it.
        Err(Found(None)) => None,
    }
}

#[derive(Debug)]
struct Found(Option<f64>);

impl Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "non-finite number {:?}", self.0)
    }
}

impl std::error::Error for Found {}

impl ser::Error for Found {
    fn custom<T: Display>(_: T) -> Self {
        Found(None)
    }
}

struct Walk;

/// Serializer methods for values that hold no float.
macro_rules! ignore {
    ($($method:ident($ty:ty)),* $(,)?) => {$(
        fn $method(self, _: $ty) -> Done {
            Ok(())
        }
    )*};
}

type Done = Result<(), Found>;

fn float(x: f64) -> Done {
    if x.is_finite() {
        Ok(())
    } else {
        Err(Found(Some(x)))
    }
}

impl ser::Serializer for Walk {
    type Ok = ();
    type Error = Found;
    type SerializeSeq = Walk;
    type SerializeTuple = Walk;
    type SerializeTupleStruct = Walk;
    type SerializeTupleVariant = Walk;
    type SerializeMap = Walk;
    type SerializeStruct = Walk;
    type SerializeStructVariant = Walk;

    fn serialize_f32(self, v: f32) -> Done {
        float(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Done {
        float(v)
    }
    ignore! {
        serialize_bool(bool), serialize_i8(i8), serialize_i16(i16), serialize_i32(i32),
        serialize_i64(i64), serialize_u8(u8), serialize_u16(u16), serialize_u32(u32),
        serialize_u64(u64), serialize_char(char), serialize_str(&str), serialize_bytes(&[u8])
    }
    fn serialize_none(self) -> Done {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Done {
        value.serialize(Walk)
    }
    fn serialize_unit(self) -> Done {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Done {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Done {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, v: &T) -> Done {
        v.serialize(Walk)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        v: &T,
    ) -> Done {
        v.serialize(Walk)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Walk, Found> {
        Ok(Walk)
    }
    fn serialize_tuple(self, _: usize) -> Result<Walk, Found> {
        Ok(Walk)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Walk, Found> {
        Ok(Walk)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Walk, Found> {
        Ok(Walk)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Walk, Found> {
        Ok(Walk)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Walk, Found> {
        Ok(Walk)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Walk, Found> {
        Ok(Walk)
    }
}

/// The compound serializers: each element or field is walked in turn.
macro_rules! compound {
    ($($name:ident :: $method:ident ($($key:ty)?);)*) => {$(
        impl ser::$name for Walk {
            type Ok = ();
            type Error = Found;
            fn $method<T: Serialize + ?Sized>(&mut self, $(_: $key,)? v: &T) -> Done {
                v.serialize(Walk)
            }
            fn end(self) -> Done {
                Ok(())
            }
        }
    )*};
}

compound! {
    SerializeSeq::serialize_element();
    SerializeTuple::serialize_element();
    SerializeTupleStruct::serialize_field();
    SerializeTupleVariant::serialize_field();
    SerializeStruct::serialize_field(&'static str);
    SerializeStructVariant::serialize_field(&'static str);
}

impl ser::SerializeMap for Walk {
    type Ok = ();
    type Error = Found;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Done {
        k.serialize(Walk)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Done {
        v.serialize(Walk)
    }
    fn end(self) -> Done {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Serialize;

    use super::non_finite;

    #[derive(Serialize)]
    struct Nested {
        name: String,
        scores: Vec<f64>,
        by_id: BTreeMap<String, f32>,
        maybe: Option<f64>,
        pair: (u8, f64),
        json: serde_json::Value,
    }

    fn nested(score: f64, by_id: f32, maybe: Option<f64>, pair: f64) -> Nested {
        Nested {
            name: "x".into(),
            scores: vec![0.5, score],
            by_id: [("a".to_string(), by_id)].into(),
            maybe,
            pair: (1, pair),
            json: serde_json::json!({"k": [1.5, null, "s"]}),
        }
    }

    #[test]
    fn finds_a_non_finite_float_wherever_it_is_and_nothing_else() {
        assert_eq!(non_finite(&nested(1.0, 2.0, None, 3.0)), None);
        assert_eq!(non_finite(&nested(1.0, 2.0, Some(4.0), 3.0)), None);
        assert!(non_finite(&nested(f64::NAN, 2.0, None, 3.0)).is_some_and(f64::is_nan));
        assert_eq!(
            non_finite(&nested(1.0, f32::INFINITY, None, 3.0)),
            Some(f64::INFINITY)
        );
        assert_eq!(
            non_finite(&nested(1.0, 2.0, Some(f64::NEG_INFINITY), 3.0)),
            Some(f64::NEG_INFINITY)
        );
        assert!(non_finite(&nested(1.0, 2.0, None, f64::NAN)).is_some());
    }

    #[test]
    fn agrees_with_reading_serde_json_back() {
        // The check it replaces: what serde_json writes and cannot read back.
        for x in [
            0.0,
            -1.5,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::NAN,
            f64::INFINITY,
        ] {
            let bytes = serde_json::to_vec(&vec![x]).unwrap();
            let reads_back = serde_json::from_slice::<Vec<f64>>(&bytes).is_ok();
            assert_eq!(non_finite(&vec![x]).is_none(), reads_back, "{x}");
        }
    }
}
