//! Emits the code for a validated grain. Everything is named through `::grains::__private`; the generated
//! reference is a few lines a method over `RefCore::call`, where the logic lives.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Ident, LitStr};

use crate::parse::{FieldInit, GrainImpl, GrainStruct};

pub(crate) fn grain_struct(model: &GrainStruct) -> TokenStream {
    let item = &model.item;
    let ident = &item.ident;
    let type_name = model.name.clone().unwrap_or_else(|| LitStr::new(&ident.to_string(), ident.span()));
    // Validated: an unparsable text never gets here.
    let idle_timeout = match model.idle_timeout.as_ref().map(|lit| crate::duration::parse_duration(&lit.value())) {
        Some(Ok(timeout)) => {
            let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            quote!(::core::option::Option::Some(::grains::__private::Duration::from_millis(#ms)))
        }
        _ => quote!(::core::option::Option::None),
    };
    // Validated: an unknown name never gets here.
    let variant = model
        .placement
        .as_ref()
        .and_then(|lit| crate::validate::PLACEMENTS.iter().find(|(name, _)| *name == lit.value()))
        .map_or("Random", |(_, variant)| variant);
    let placement = Ident::new(variant, Span::call_site());
    let body = match &item.fields {
        syn::Fields::Named(_) => {
            let inits = model.fields.iter().map(|field| {
                let name = &field.ident;
                match &field.init {
                    FieldInit::State(state) => quote! {
                        #name: ::grains::__private::PersistentState::load(ctx, #state).await?
                    },
                    FieldInit::Journal { name: journal, snapshot_every } => quote! {
                        #name: ::grains::__private::Journaled::load(ctx, #journal, #snapshot_every).await?
                    },
                    FieldInit::Context => quote!(#name: ::core::clone::Clone::clone(ctx)),
                    FieldInit::Default => quote!(#name: ::core::default::Default::default()),
                }
            });
            quote!(Self { #(#inits,)* })
        }
        _ => quote!(Self),
    };
    quote! {
        #item

        impl ::grains::__private::GrainType for #ident {
            const TYPE_NAME: &'static str = #type_name;
            const OPTIONS: ::grains::__private::GrainOptions =
                ::grains::__private::GrainOptions {
                    idle_timeout: #idle_timeout,
                    placement: ::grains::__private::Placement::#placement,
                };

            #[allow(unused_variables)]
            fn build(
                ctx: &::grains::__private::GrainContext,
            ) -> impl ::grains::__private::Future<
                Output = ::grains::__private::Result<Self, ::grains::__private::GrainError>,
            > + ::core::marker::Send + '_ {
                async move { ::grains::__private::Result::Ok(#body) }
            }
        }
    }
}

pub(crate) fn grain_impl(model: &GrainImpl) -> TokenStream {
    let item = &model.item;
    let Some(grain) = &model.self_ident else { return quote!(#item) };
    let request = format_ident!("{}Request", grain);
    let response = format_ident!("{}Response", grain);
    let reference = format_ident!("{}Ref", grain);

    let names: Vec<&Ident> = model.methods.iter().map(|m| m.ident()).collect();
    // Matching a reference to an enum without variants needs the place itself: `match *r {}`.
    let deref = if names.is_empty() { quote!(*) } else { quote!() };
    let name_strs: Vec<LitStr> = names.iter().map(|n| LitStr::new(&n.to_string(), n.span())).collect();
    let arg_names: Vec<Vec<&Ident>> = model.methods.iter().map(|m| m.args.iter().map(|(n, _)| n).collect()).collect();
    let arg_types: Vec<Vec<&syn::Type>> =
        model.methods.iter().map(|m| m.args.iter().map(|(_, t)| t).collect()).collect();
    let outputs: Vec<&syn::Type> = model.methods.iter().map(|m| &m.output).collect();

    // Every codec use names its type through `arg::<T>()` / `ret::<T>()`, spanned at the type, so a type that
    // cannot cross the wire gets one error, at the type, however often the generated code uses it.
    let arg_codecs: Vec<Vec<TokenStream>> = model
        .methods
        .iter()
        .map(|m| m.args.iter().map(|(_, ty)| quote_spanned!(ty.span()=> ::grains::__private::arg::<#ty>())).collect())
        .collect();
    let ret_codecs: Vec<TokenStream> = model
        .methods
        .iter()
        .map(|m| {
            let out = &m.output;
            quote_spanned!(out.span()=> ::grains::__private::ret::<#out>())
        })
        .collect();
    let arg_counts: Vec<u32> = model.methods.iter().map(|m| m.args.len() as u32).collect();

    // A reply is the grain's own error when the method returns a `Result` (by its written type) holding `Err`.
    let is_errors: Vec<TokenStream> = model
        .methods
        .iter()
        .map(|m| {
            if is_result(&m.output) {
                quote!(::grains::__private::result_is_err(value))
            } else {
                quote!({
                    let _ = value;
                    false
                })
            }
        })
        .collect();
    let http = http_methods(model, grain);

    let request_doc = format!("The calls of grain `{grain}`: one variant per grain method, holding its arguments.");
    let response_doc =
        format!("The replies of grain `{grain}`: one variant per grain method, holding its return value.");
    let reference_doc = format!(
        "A typed reference to a `{grain}` grain, generated by `#[grain]`: one async method per grain method.\n\n\
         Each returns `Result<R, CallError>`, where `R` is what the grain method returns."
    );

    let ref_methods = model.methods.iter().zip(&arg_names).zip(&arg_types).map(|((m, args), tys)| {
        let name = m.ident();
        let out = &m.output;
        let docs = m.func.attrs.iter().filter(|a| a.path().is_ident("doc"));
        quote! {
            #(#docs)*
            // As many arguments as the grain method the author wrote; a lint on that is theirs to answer there.
            #[allow(clippy::too_many_arguments)]
            pub async fn #name(&self, #(#args: #tys),*)
                -> ::grains::__private::Result<#out, ::grains::__private::CallError>
            {
                match self.core.call::<#grain>(#request::#name(#(#args),*)).await? {
                    #response::#name(value) => ::grains::__private::Result::Ok(value),
                    #[allow(unreachable_patterns)]
                    _ => ::grains::__private::Result::Err(::grains::__private::mismatched_reply(
                        <#grain as ::grains::__private::GrainType>::TYPE_NAME,
                        ::core::stringify!(#name),
                    )),
                }
            }
        }
    });

    let hooks = [("on_activate", &model.on_activate), ("on_deactivate", &model.on_deactivate)].into_iter().filter_map(
        |(hook, func)| {
            func.as_ref().map(|func| {
                let hook = Ident::new(hook, Span::call_site());
                // Spanned at the user's hook, so a type error in its signature points there.
                let call = quote_spanned!(func.sig.span()=> #grain::#hook(self, ctx));
                quote! {
                    fn #hook<'a>(
                        &'a mut self,
                        ctx: &'a ::grains::__private::GrainContext,
                    ) -> impl ::grains::__private::Future<
                        Output = ::grains::__private::Result<(), ::grains::__private::GrainError>,
                    > + ::core::marker::Send + 'a {
                        #call
                    }
                }
            })
        },
    );

    // A grain with an `on_reminder` hook handles reminders: ticks reach it through `Grain::on_reminder`.
    let reminder_hook = model.on_reminder.as_ref().map(|func| {
        let call = quote_spanned!(func.sig.span()=> #grain::on_reminder(self, tick));
        quote! {
            const REMINDABLE: bool = true;

            fn on_reminder(
                &mut self,
                tick: ::grains::__private::ReminderTick,
            ) -> impl ::grains::__private::Future<
                Output = ::grains::__private::Result<(), ::grains::__private::GrainError>,
            > + ::core::marker::Send + '_ {
                #call
            }
        }
    });

    quote! {
        #item

        #[doc = #request_doc]
        #[allow(non_camel_case_types, private_interfaces, dead_code)]
        pub enum #request {
            #(
                #[doc = ::core::concat!("Arguments of `", ::core::stringify!(#names), "`.")]
                #names(#(#arg_types),*),
            )*
        }

        #[doc = #response_doc]
        #[allow(non_camel_case_types, private_interfaces, dead_code)]
        pub enum #response {
            #(
                #[doc = ::core::concat!("Return value of `", ::core::stringify!(#names), "`.")]
                #names(#outputs),
            )*
        }

        impl ::grains::__private::WireMessage for #request {
            fn encode_body(&self) -> ::grains::__private::Result<::std::vec::Vec<u8>, ::grains::__private::CodecError> {
                match #deref self {
                    #(
                        Self::#names(#(#arg_names),*) => {
                            let mut out = ::std::vec::Vec::new();
                            ::grains::__private::begin_args(&mut out, #arg_counts)?;
                            #( #arg_codecs.encode(#arg_names, &mut out)?; )*
                            ::grains::__private::Result::Ok(out)
                        }
                    )*
                }
            }
        }

        impl ::grains::__private::WireMessage for #response {
            fn encode_body(&self) -> ::grains::__private::Result<::std::vec::Vec<u8>, ::grains::__private::CodecError> {
                match #deref self {
                    #(
                        Self::#names(value) => {
                            let mut out = ::std::vec::Vec::new();
                            #ret_codecs.encode(value, &mut out)?;
                            ::grains::__private::Result::Ok(out)
                        }
                    )*
                }
            }

            fn is_error(&self) -> bool {
                match #deref self {
                    #( Self::#names(value) => #is_errors, )*
                }
            }
        }

        #[doc = #reference_doc]
        #[derive(Clone, Debug)]
        #[allow(private_interfaces)]
        pub struct #reference {
            core: ::grains::__private::RefCore,
        }

        impl ::grains::__private::GrainRef for #reference {
            fn from_core(core: ::grains::__private::RefCore) -> Self {
                Self { core }
            }

            fn core(&self) -> &::grains::__private::RefCore {
                &self.core
            }
        }

        #[allow(private_interfaces)]
        impl #reference {
            /// The id of the grain this reference calls.
            pub fn id(&self) -> &::grains::GrainId {
                self.core.id()
            }

            /// A copy of this reference whose calls time out after `timeout` instead of the default.
            pub fn with_timeout(&self, timeout: ::grains::__private::Duration) -> Self {
                Self { core: self.core.with_timeout(timeout) }
            }

            #(#ref_methods)*
        }

        impl ::grains::__private::Grain for #grain {
            type Request = #request;
            type Response = #response;
            type Ref = #reference;

            const METHODS: &'static [&'static str] = &[#(#name_strs),*];

            #http

            fn method_name(request: &#request) -> &'static str {
                match #deref request {
                    #( #request::#names(..) => #name_strs, )*
                }
            }

            fn decode_request(
                method: &str,
                body: &[u8],
            ) -> ::grains::__private::Result<#request, ::grains::__private::CallError> {
                match method {
                    #(
                        #name_strs => {
                            let mut input = body;
                            ::grains::__private::read_args(&mut input, #arg_counts)?;
                            #( let #arg_names = #arg_codecs.decode(&mut input)?; )*
                            ::grains::__private::Result::Ok(#request::#names(#(#arg_names),*))
                        }
                    )*
                    _ => ::grains::__private::Result::Err(::grains::__private::CallError::UnknownMethod {
                        grain_type: <#grain as ::grains::__private::GrainType>::TYPE_NAME.into(),
                        method: method.into(),
                    }),
                }
            }

            fn decode_response(
                method: &str,
                body: &[u8],
            ) -> ::grains::__private::Result<#response, ::grains::__private::CallError> {
                match method {
                    #( #name_strs => {
                        let mut input = body;
                        ::grains::__private::Result::Ok(#response::#names(#ret_codecs.decode(&mut input)?))
                    } )*
                    _ => ::grains::__private::Result::Err(::grains::__private::CallError::UnknownMethod {
                        grain_type: <#grain as ::grains::__private::GrainType>::TYPE_NAME.into(),
                        method: method.into(),
                    }),
                }
            }

            fn handle(
                &mut self,
                request: #request,
            ) -> impl ::grains::__private::Future<Output = #response> + ::core::marker::Send + '_ {
                async move {
                    match request {
                        #( #request::#names(#(#arg_names),*) => #response::#names(#grain::#names(self, #(#arg_names),*).await), )*
                    }
                }
            }

            #(#hooks)*

            #reminder_hook
        }

        ::grains::__private::inventory::submit! {
            ::grains::__private::GrainRegistration::of::<#grain>()
        }
    }
}

/// Whether a return type is written as a `Result` (`Result<T, E>`, `std::result::Result<T, E>`, an alias such as
/// `io::Result<T>`).
fn is_result(ty: &syn::Type) -> bool {
    match ty {
        syn::Type::Path(p) => p.qself.is_none() && p.path.segments.last().is_some_and(|s| s.ident == "Result"),
        syn::Type::Paren(p) => is_result(&p.elem),
        _ => false,
    }
}

/// `const HTTP` of the `Grain` impl: the methods exposed over HTTP and their JSON codecs, or nothing.
fn http_methods(model: &GrainImpl, grain: &Ident) -> TokenStream {
    let exposed: Vec<_> = model.methods.iter().filter(|m| m.http.unwrap_or(model.http)).collect();
    if exposed.is_empty() {
        return quote!();
    }
    let names: Vec<LitStr> = exposed.iter().map(|m| LitStr::new(&m.ident().to_string(), m.ident().span())).collect();
    let to_args = exposed.iter().map(|m| {
        let count = m.args.len() as u32;
        let arg_names: Vec<&Ident> = m.args.iter().map(|(n, _)| n).collect();
        let arg_strs: Vec<LitStr> = arg_names.iter().map(|n| LitStr::new(&n.to_string(), n.span())).collect();
        let codecs = m.args.iter().map(|(_, ty)| quote_spanned!(ty.span()=> ::grains::__private::arg::<#ty>()));
        let tys = m.args.iter().map(|(_, ty)| ty);
        quote! {
            {
                #[allow(unused_mut, unused_variables)]
                let mut values = ::grains::__private::json_args(json, &[#(#arg_strs),*])?.into_iter();
                let mut out = ::std::vec::Vec::new();
                ::grains::__private::begin_args(&mut out, #count)?;
                #(
                    let #arg_names: #tys = ::grains::__private::json_value(values.next(), #arg_strs)?;
                    #codecs.encode(&#arg_names, &mut out)?;
                )*
                ::grains::__private::Result::Ok(out)
            }
        }
    });
    let to_json = exposed.iter().map(|m| {
        let out = &m.output;
        let codec = quote_spanned!(out.span()=> ::grains::__private::ret::<#out>());
        quote! {
            {
                let mut input = body;
                let value: #out = #codec.decode(&mut input)?;
                ::grains::__private::json_result(&value)
            }
        }
    });
    let not_exposed = quote! {
        _ => ::grains::__private::Result::Err(::grains::__private::CodecError(::std::format!(
            "`{}` has no method `{}` served over HTTP",
            <#grain as ::grains::__private::GrainType>::TYPE_NAME,
            method,
        ))),
    };
    quote! {
        const HTTP: ::core::option::Option<::grains::__private::HttpMethods> =
            ::core::option::Option::Some(::grains::__private::HttpMethods {
                methods: &[#(#names),*],
                json_to_args: {
                    fn json_to_args(
                        method: &str,
                        json: &[u8],
                    ) -> ::grains::__private::Result<::std::vec::Vec<u8>, ::grains::__private::CodecError> {
                        match method {
                            #( #names => #to_args )*
                            #not_exposed
                        }
                    }
                    json_to_args
                },
                result_to_json: {
                    fn result_to_json(
                        method: &str,
                        body: &[u8],
                    ) -> ::grains::__private::Result<::std::vec::Vec<u8>, ::grains::__private::CodecError> {
                        match method {
                            #( #names => #to_json )*
                            #not_exposed
                        }
                    }
                    result_to_json
                },
            });
    }
}
